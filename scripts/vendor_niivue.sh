#!/usr/bin/env bash
# Rebuild src/nodulenet/serve/static/app/vendor/niivue/ from the npm registry: the web viewer's volume renderer.
#
#   scripts/vendor_niivue.sh            # the version in VERSION (what is vendored now)
#   scripts/vendor_niivue.sh 0.70.0     # another version (then run the browser test: tests/test_serve_web.py)
#
# What is copied: NiiVue's self-contained UMD bundle (dist/niivue.umd.js: its dependencies are inside it, no
# import, no worker and nothing it fetches by itself), NiiVue's licence (BSD-2-Clause; the npm package does not
# carry the file, so its text is kept here), the licences of the npm dependencies bundled into it, and VERSION
# (version, tarball integrity and the file's SHA-256) so a reader can check the file against the registry.
# Needs npm (node) on this machine only: the server never fetches anything at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=src/nodulenet/serve/static/app/vendor/niivue
VERSION=${1:-$(sed -n 's/^version=//p' "$DEST/VERSION" 2>/dev/null || true)}
VERSION=${VERSION:-0.69.0}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm install --silent --ignore-scripts --no-audit --no-fund --no-save "@niivue/niivue@$VERSION" >/dev/null)
pkg="$work/node_modules/@niivue/niivue"
installed=$(node -p "require('$pkg/package.json').version")
[ "$installed" = "$VERSION" ] || { echo "npm installed $installed, not $VERSION" >&2; exit 1; }
integrity=$(cd "$work" && npm view "@niivue/niivue@$VERSION" dist.integrity)

mkdir -p "$DEST"
cp "$pkg/dist/niivue.umd.js" "$DEST/niivue.umd.js"
cat > "$DEST/LICENSE" <<'EOF'
BSD 2-Clause License

Copyright (c) 2021, Niivue
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
EOF

# The runtime dependencies npm installed with NiiVue (bundled into the UMD file), each with its licence file.
{
    echo "Licences of the npm packages bundled into niivue.umd.js (@niivue/niivue $VERSION and its dependencies)."
    for dir in "$work"/node_modules/* "$work"/node_modules/@*/*; do
        [ -f "$dir/package.json" ] || continue
        name=$(node -p "require('$dir/package.json').name")
        case "$name" in @niivue/niivue|@rollup/*) continue ;; esac  # NiiVue: LICENSE; rollup: a build tool only
        lic=$(find "$dir" -maxdepth 1 -iname 'licen[cs]e*' | head -n 1)
        echo
        echo "==== $name $(node -p "require('$dir/package.json').version") ($(node -p "require('$dir/package.json').license"))"
        if [ -n "$lic" ]; then cat "$lic"; else echo "(no licence file in the package)"; fi
    done
} > "$DEST/THIRD-PARTY-LICENSES"

cat > "$DEST/VERSION" <<EOF
package=@niivue/niivue
version=$VERSION
file=dist/niivue.umd.js
tarball_integrity=$integrity
sha256=$(sha256sum "$DEST/niivue.umd.js" | cut -d' ' -f1)
bytes=$(stat -c %s "$DEST/niivue.umd.js")
EOF
echo "vendored @niivue/niivue $VERSION into $DEST ($(du -h "$DEST/niivue.umd.js" | cut -f1))"
