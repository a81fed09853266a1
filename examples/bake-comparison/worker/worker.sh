#!/bin/sh
# The "worker": consumes one queue.
echo "worker for queue $QUEUE on $(uname -m)"
