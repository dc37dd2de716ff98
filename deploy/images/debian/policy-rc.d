#!/bin/sh
# Packages installed into an image must not start their services: there is no init, and an
# image is built, not booted (invoke-rc.d reads exit status 101 as "action forbidden").
exit 101
