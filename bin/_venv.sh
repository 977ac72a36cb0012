# Sourced by the bin/ scripts: make sure .venv exists with msp installed.
# Re-installs when setup.cfg changes; quiet when nothing is to be done.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MSP_VENV:-$root/.venv}"
extras="${MSP_EXTRAS:-test}"

pick_python() {
    for py in python3.11 python3.12 python3.13 python3; do
        if command -v "$py" >/dev/null 2>&1 &&
            "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            echo "$py"
            return
        fi
    done
    echo "msp needs Python 3.11 or newer" >&2
    exit 2
}

if [ ! -x "$venv/bin/python" ]; then
    "$(pick_python)" -m venv "$venv"
fi
stamp="$venv/.msp-installed"
want="$(cat "$root/setup.cfg" "$root/pyproject.toml" | cksum) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing msp and its dependencies into $venv ..." >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -e "$root[$extras]"
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
