#!/bin/sh
# A stand-in for an application: `version` prints its version, CPU and uid.
case "$1" in
    version)
        echo "app $APP_VERSION ($(uname -m))"
        echo "uid $(id -u)"
        ;;
    serve)
        echo "serving from $APP_HOME"
        ;;
    *)
        echo "usage: app version|serve" >&2
        exit 64
        ;;
esac
