#!/bin/sh
echo "hello from $(cat /app/arch.txt)"
