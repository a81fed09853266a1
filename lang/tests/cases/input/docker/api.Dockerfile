# Imported by the `dockerfile` example of docs/language.md.
ARG BASE=docker.io/library/alpine:3.20
FROM $BASE AS build
ARG VERSION
RUN echo "$VERSION" > /version

FROM $BASE AS runtime
COPY --from=build /version /version
CMD ["cat", "/version"]
