ARG BASE
FROM ${BASE} AS build
ARG VERSION
COPY api/ /src/
RUN mkdir -p /out && sed "s/@VERSION@/${VERSION}/" /src/server.sh > /out/server && chmod 755 /out/server

FROM ${BASE}
COPY --from=build /out/server /usr/local/bin/server
RUN mkdir -p /var/www
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/server"]
