#!/bin/sh
# The "api": answers every request with its version.
echo "api @VERSION@ listening on :8080"
exec httpd -f -p 8080 -h /var/www
