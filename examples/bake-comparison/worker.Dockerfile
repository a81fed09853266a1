ARG BASE
FROM ${BASE}
ARG QUEUE
COPY worker/ /app/
ENV QUEUE=${QUEUE}
CMD ["sh", "/app/worker.sh"]
