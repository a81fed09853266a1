#!/bin/sh
# Prints what a debugging container usually wants to know first.
echo "arch: $(uname -m)"
echo "user: $(id -u):$(id -g)"
echo "workdir: $(pwd)"
