#!/usr/bin/env bash
# (Re)builds fasa into .devbundle/build and (re)packs .devbundle/bundle.tar.gz (in the
# repository root, .devbundle/ is git-ignored by .gitignore): a
# self-contained tree that device.sh extracts to /tmp/fb on a machine WITHOUT Open MPI,
# ZeroMQ, protobuf-c, libsodium... and with an unknown (older or newer) glibc.
#
#   bench/device/pack.sh          (from anywhere; needs patchelf: apt-get install patchelf)
#
# Layout under /tmp/fb (fixed: the interpreter and RPATH of every ELF point into it):
#   lib/                         every shared library, glibc and ld-linux-x86-64.so.2 included
#   bin/                         fasa-server, fasa, bench_server (+ run-local.sh, stop-local.sh)
#   usr/bin/                     orterun (= mpirun), orted, ompi_info     (OPAL_PREFIX=/tmp/fb/usr)
#   usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3/   Open MPI MCA plugins (pkglibdir)
#   usr/lib/x86_64-linux-gnu/pmix2/{lib/pmix,share}  PMIx plugins and help (PMIX_INSTALL_PREFIX)
#   usr/share/openmpi/           Open MPI help and data files (pkgdatadir)
#   etc/openmpi/                 openmpi-mca-params.conf (OPAL_SYSCONFDIR)
#   empty/                       an empty directory for plugin paths we switch off (hwloc...)
# Executables get PT_INTERP /tmp/fb/lib/ld-linux-x86-64.so.2; every non-glibc ELF gets
# DT_RPATH /tmp/fb/lib, so children exec'd by mpirun and dlopen'ed plugins resolve inside
# the tree and never see the device's libraries (no LD_LIBRARY_PATH needed or wanted).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
here=$repo/.devbundle
mkdir -p "$here"
FB=/tmp/fb
stage=$here/stage
build=$here/build
command -v patchelf >/dev/null || { echo "pack: needs patchelf (apt-get install -y patchelf)" >&2; exit 1; }

echo "== build"
cmake -S "$repo" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_C_COMPILER_LAUNCHER=ccache >/dev/null
cmake --build "$build" -j2 --target fasa-server fasa bench_server bench_batch

echo "== stage"
rm -rf "$stage"
mkdir -p "$stage"/{lib,bin,usr/bin,empty,etc/openmpi}
ML=/usr/lib/x86_64-linux-gnu
OMPI_PLUG=$ML/openmpi/lib/openmpi3
PMIX=$ML/pmix2
mkdir -p "$stage$OMPI_PLUG" "$stage$PMIX/lib/pmix" "$stage/usr/share"
cp "$build/fasa-server" "$build/fasa" "$build/bench/bench_server" "$build/bench/bench_batch" "$stage/bin/"
cp "$repo/deploy/run-local.sh" "$repo/deploy/stop-local.sh" "$stage/bin/"
cp /usr/bin/setsid "$stage/bin/"   # run-local.sh needs it; the device may lack util-linux
cp /usr/bin/orterun /usr/bin/orted /usr/bin/ompi_info "$stage/usr/bin/"
ln -s orterun "$stage/usr/bin/mpirun"
ln -s orterun "$stage/usr/bin/mpiexec"
cp -a /usr/share/openmpi "$stage/usr/share/"
cp /etc/openmpi/openmpi-mca-params.conf "$stage/etc/openmpi/"
cp -a "$PMIX/share" "$stage$PMIX/"
cp "$PMIX"/lib/pmix/*.so "$stage$PMIX/lib/pmix/"
# Plugins: all except those that need the fabric stacks we switch off anyway (UCX,
# libfabric, PSM, verbs), so those libraries never load on the device.
skipped=()
for p in "$OMPI_PLUG"/*.so; do
    deps=$(ldd "$p")   # not piped into grep -q: with pipefail, SIGPIPE would read as no match
    if grep -qE 'libuc[pst]|libfabric|libpsm|libibverbs|librdmacm' <<<"$deps"; then
        skipped+=("$(basename "$p")")
        continue
    fi
    cp "$p" "$stage$OMPI_PLUG/"
done
echo "skipped plugins (fabric deps): ${skipped[*]}"

# Every library the staged ELFs need (closure by ldd, which follows the transitive deps).
mapfile -t elfs < <(find "$stage" -type f \( -name '*.so' -o -perm -u+x \) -exec sh -c \
    'head -c4 "$1" | grep -q ELF && echo "$1"' _ {} \;)
declare -A seen=()
for e in "${elfs[@]}"; do
    while read -r name arrow path _; do
        if [ "$arrow" = "=>" ] && [ "$path" = "not" ]; then
            echo "pack: $e needs $name, not found here" >&2; exit 1
        fi
        [ "$arrow" = "=>" ] || continue
        [ -n "${seen[$name]:-}" ] && continue
        seen[$name]=1
        cp -L "$path" "$stage/lib/$name"
    done < <(ldd "$e")
done
# glibc itself, whole (also what NSS or iconv might dlopen), and the loader.
for f in $(dpkg -L libc6:amd64 | grep -E '^/(usr/)?lib/x86_64-linux-gnu/[^/]+\.so(\.[0-9]+)*$'); do
    cp -L "$f" "$stage/lib/$(basename "$f")"
done
cp -L /lib64/ld-linux-x86-64.so.2 "$stage/lib/ld-linux-x86-64.so.2"
chmod -R u+w "$stage"

echo "== patch"
glibc_names=" $(dpkg -L libc6:amd64 | grep -E '\.so(\.[0-9]+)*$' | xargs -n1 basename | tr '\n' ' ') "
n_exe=0 n_lib=0
while read -r f; do
    head -c4 "$f" | grep -q ELF || continue
    b=$(basename "$f")
    [ "$b" = ld-linux-x86-64.so.2 ] && continue
    case "$glibc_names" in *" $b "*) [ "$(dirname "$f")" = "$stage/lib" ] && continue ;; esac
    if patchelf --print-interpreter "$f" >/dev/null 2>&1; then
        patchelf --set-interpreter "$FB/lib/ld-linux-x86-64.so.2" "$f"
        n_exe=$((n_exe + 1))
    else
        n_lib=$((n_lib + 1))
    fi
    patchelf --force-rpath --set-rpath "$FB/lib" "$f"
done < <(find "$stage" -type f)
echo "patched $n_exe executables and $n_lib libraries"

{
    echo "packed $(date -u +%FT%TZ) on $(hostname) from $(git -C "$repo" rev-parse --short HEAD) + $(git -C "$repo" status --short | wc -l) changed file(s)"
    echo "glibc $(getconf GNU_LIBC_VERSION); $(/usr/bin/orterun --version 2>&1 | head -1)"
} > "$stage/BUNDLE_INFO"
cat "$stage/BUNDLE_INFO"

echo "== pack"
rm -f "$here/bundle.tar.gz"
tar -C "$stage" --owner=0 --group=0 -cf - . | gzip -9 > "$here/bundle.tar.gz"
du -sh "$stage" | sed 's/^/staged: /'
ls -l "$here/bundle.tar.gz" | awk '{printf "bundle.tar.gz: %.1f MiB\n", $5/1048576}'
