#!/usr/bin/env bash
# Apertis Studio launcher for Linux (and for macOS, through start.command): finds Python 3.10+, creates or
# reuses the virtual environment .venv in the app folder, then hands over to launchers/bootstrap.py, which
# installs what changed and starts the studio. Every argument is passed on (e.g. --port 7861, --no-browser).
# Written for bash 3.2, the one macOS ships (so no `set -u`: it trips over an empty "$@" there).

app_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || {
    echo "ERROR: cannot open the app folder that holds $0; check that it still exists and is readable." >&2
    exit 1
}
cd "$app_dir" || exit 1

# The app's own packages only: nothing from the user's Python setup may leak into the venv or the studio.
unset PYTHONPATH PYTHONHOME
export PYTHONNOUSERSITE=1

# Succeeds when "$1" runs and is Python 3.10 or newer.
python_ok() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1
}

# Prints the first suitable Python: APERTIS_PYTHON when set, else the versions the pinned requirements
# are known to install on (3.12, 3.11 first), then whatever python3 is.
find_python() {
    if [ -n "${APERTIS_PYTHON:-}" ]; then
        python_ok "$APERTIS_PYTHON" && echo "$APERTIS_PYTHON" && return 0
        echo "ERROR: APERTIS_PYTHON is set to '$APERTIS_PYTHON', which is not Python 3.10 or newer." >&2
        return 1
    fi
    local name path dir
    for name in python3.12 python3.11 python3.13 python3.10 python3 python; do
        path="$(command -v "$name" 2>/dev/null)" || continue
        # macOS's /usr/bin/python3 is 3.9 at best, and without the developer tools it opens an install dialog.
        [ "$(uname -s)" = Darwin ] && [ "$path" = /usr/bin/python3 ] && continue
        python_ok "$path" && echo "$path" && return 0
    done
    # A double-clicked start.command may not have the python.org or Homebrew folders on its PATH.
    for dir in /Library/Frameworks/Python.framework/Versions/Current/bin /opt/homebrew/bin /usr/local/bin; do
        for name in python3.12 python3.11 python3.13 python3.10 python3; do
            python_ok "$dir/$name" && echo "$dir/$name" && return 0
        done
    done
    return 1
}

explain_no_python() {
    echo "ERROR: Apertis Studio needs Python 3.10 or newer, and none was found." >&2
    if [ "$(uname -s)" = Darwin ]; then
        echo "Install Python 3.12 from https://www.python.org/downloads/macos/ (or: brew install python@3.12)," >&2
    else
        echo "Install Python 3.12 (or 3.10+) with your package manager, for example:" >&2
        echo "  Debian/Ubuntu: sudo apt install python3 python3-venv" >&2
        echo "  Fedora:        sudo dnf install python3" >&2
        echo "  Arch:          sudo pacman -S python" >&2
    fi
    echo "then start this launcher again. To use a particular Python: APERTIS_PYTHON=/path/to/python3 $0" >&2
}

venv_python="$app_dir/.venv/bin/python"
if ! python_ok "$venv_python"; then
    if [ -e .venv ]; then
        # Typically the Python it was made from was upgraded or removed; its packages are reinstalled.
        echo "The virtual environment in $app_dir/.venv does not work any more; making a new one."
        rm -rf .venv
    fi
    python="$(find_python)" || { explain_no_python; exit 1; }
    echo "Creating the virtual environment in $app_dir/.venv with $python ..."
    if ! "$python" -m venv .venv; then
        rm -rf .venv
        echo "ERROR: $python could not create a virtual environment (messages above)." >&2
        echo "On Debian/Ubuntu install the venv module: sudo apt install python3-venv (or python3.X-venv for" >&2
        echo "your version), then start this launcher again." >&2
        exit 1
    fi
fi

exec "$venv_python" "$app_dir/launchers/bootstrap.py" "$@"
