#!/usr/bin/env bash
# Find or build the Asterisk the real-PBX test tier drives; print the path of its binary.
#
# Order: $CALLERID_TEST_ASTERISK (a path to sbin/asterisk), then `asterisk` on PATH, then a
# build cached outside the checkout ($CALLERID_CACHE, default ~/.cache/callerid), built from
# the source tarball ($CALLERID_ASTERISK_TARBALL, default ../shared/asterisk/ beside the
# checkout) when the cache is empty. Nothing is downloaded by the build (configured without
# the bundled pjproject/jansson/libjwt, sound and MOH packages off), only the prefix is written
# (no `make samples`/`make config`), about 10 minutes on 2 cores; later runs reuse it.
# Debian's digit and prompt sounds (asterisk-core-sounds-en-wav) are installed as well:
# SAY DIGITS plays nothing without them.
#
# Exit 0 with the binary's path on stdout; exit 1 with one line on stderr saying what is
# missing. Everything else this prints goes to stderr.
set -euo pipefail

version=22.10.1
here=$(cd "$(dirname "$0")/../.." && pwd)
cache=${CALLERID_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/callerid}
prefix=$cache/asterisk-$version
tarball=${CALLERID_ASTERISK_TARBALL:-$here/../shared/asterisk/asterisk-$version.tar.xz}
sounds_pkg=asterisk-core-sounds-en-wav
build_pkgs=(build-essential pkg-config libedit-dev libjansson-dev libxml2-dev uuid-dev
  libsqlite3-dev libssl-dev libcurl4-openssl-dev xz-utils)

say() { echo "ensure_asterisk: $*" >&2; }

apt_updated=""
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    say "needs the Debian packages $* (run as root, or install them yourself)"
    exit 1
  fi
  # Another apt may hold the dpkg lock (unattended upgrades, a second session): wait for it.
  local wait=(-o DPkg::Lock::Timeout=600)
  [ -n "$apt_updated" ] || { apt-get "${wait[@]}" update -qq >&2; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get "${wait[@]}" install -y -qq --no-install-recommends \
    "$@" >&2
}

ensure_sounds() {
  # Debian's -wav package installs into en_US_f_Allison; the `en` link comes only with the
  # recommended asterisk-core-sounds-en, which --no-install-recommends leaves out.
  [ -f /usr/share/asterisk/sounds/en/digits/1.wav ] \
    || [ -f /usr/share/asterisk/sounds/en_US_f_Allison/digits/1.wav ] || apt_install "$sounds_pkg"
}

if [ -n "${CALLERID_TEST_ASTERISK:-}" ]; then
  [ -x "$CALLERID_TEST_ASTERISK" ] || { say "CALLERID_TEST_ASTERISK=$CALLERID_TEST_ASTERISK is not an executable"; exit 1; }
  ensure_sounds
  echo "$CALLERID_TEST_ASTERISK"
  exit 0
fi
if found=$(command -v asterisk 2>/dev/null); then
  ensure_sounds
  echo "$found"
  exit 0
fi
if [ -x "$prefix/sbin/asterisk" ] && [ -f "$prefix/.built" ]; then
  ensure_sounds
  echo "$prefix/sbin/asterisk"
  exit 0
fi

[ -f "$tarball" ] || { say "no Asterisk: set CALLERID_TEST_ASTERISK, put asterisk on PATH, or provide $tarball"; exit 1; }
if [ -f "$tarball.sha256" ]; then
  expected=$(awk '{print $1}' "$tarball.sha256")
  actual=$(sha256sum "$tarball" | awk '{print $1}')
  [ "$expected" = "$actual" ] || { say "$tarball does not match its .sha256"; exit 1; }
fi

missing=()
for pkg in "${build_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
ensure_sounds

# Build in a scratch folder beside the cache; the prefix appears only when complete.
mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
say "building Asterisk $version into $prefix (about 10 minutes; once per machine)"
started=$(date +%s)
tar -xJf "$tarball" -C "$work"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n 1)
cd "$src"
rm -rf "$prefix"
./configure --prefix="$prefix" --without-pjproject --without-pjproject-bundled \
  --with-jansson-bundled=no --with-libjwt-bundled=no >"$work/configure.log" 2>&1 \
  || { tail -n 20 "$work/configure.log" >&2; say "configure failed"; exit 1; }
make menuselect.makeopts >"$work/menuselect.log" 2>&1
menuselect/menuselect --disable-category MENUSELECT_CORE_SOUNDS \
  --disable-category MENUSELECT_MOH --disable-category MENUSELECT_EXTRA_SOUNDS \
  --disable BUILD_NATIVE menuselect.makeopts >>"$work/menuselect.log" 2>&1
make -j"$(nproc)" >"$work/make.log" 2>&1 || { tail -n 30 "$work/make.log" >&2; say "make failed"; exit 1; }
make install >"$work/install.log" 2>&1 || { tail -n 30 "$work/install.log" >&2; say "make install failed"; exit 1; }
touch "$prefix/.built"
say "built in $(( $(date +%s) - started )) s"
echo "$prefix/sbin/asterisk"
