#!/usr/bin/env bash
# Apertis Studio launcher for macOS: Finder opens a .command file in Terminal when it is double-clicked.
# It runs start.sh (which does all the work) and keeps the window open after a failure so the message
# can be read; Terminal would otherwise close it, or leave it showing only "[Process completed]".
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# bash, not ./start.sh: a download or a copy may have dropped start.sh's executable bit.
bash "$here/start.sh" "$@"
status=$?
# 130 is a Ctrl-C: the user stopped it on purpose, so there is nothing to read.
if [ "$status" -ne 0 ] && [ "$status" -ne 130 ]; then
    echo
    echo "Apertis Studio stopped with an error (exit code $status): the message above says what to do."
    echo "Press Enter to close this window."
    read -r _
fi
exit "$status"
