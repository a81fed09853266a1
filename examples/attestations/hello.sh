#!/bin/sh
echo "hello from an attested image"
