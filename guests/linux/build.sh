#!/usr/bin/env bash
# Builds guests/build/linux/Image from Debian's linux-source-6.1, the config
# fragment beside this script and /init (init.c), reproducibly: the same
# sources and toolchain give the same bytes (pinned KBUILD_BUILD_*, a fixed
# initramfs timestamp, source paths mapped away), so the committed Image can be
# checked against its sources. The kernel is built out of tree under
# guests/obj/linux/ so the unpacked source stays pristine and a rebuild after an
# /init change only relinks.
#
# Usage: guests/linux/build.sh           build, then check against the committed SHA256SUMS
#        LINUX_UPDATE=1 guests/linux/build.sh   build and replace the committed Image + SHA256SUMS
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
guests="$(dirname "$here")"
obj="$guests/obj/linux"
src="$obj/linux-source-6.1"
kbuild="$obj/build"
out="$guests/build/linux"
tarball=/usr/src/linux-source-6.1.tar.xz
cross=riscv64-linux-gnu-
jobs="${JOBS:-2}"

# Pinned so that `uname -v`, the banner and the initramfs carry no build-time
# facts: /init prints uname, and QEMU and Ferry must print the same lines.
export KBUILD_BUILD_TIMESTAMP="Sun Nov 1 00:00:00 UTC 2026"
export KBUILD_BUILD_USER=ferry
export KBUILD_BUILD_HOST=ferry
export KBUILD_BUILD_VERSION=1
export SOURCE_DATE_EPOCH=1793491200
export LC_ALL=C TZ=UTC

for tool in ${cross}gcc flex bison bc cpio; do
  command -v "$tool" >/dev/null || { echo "guests-linux: $tool not found (run: make guests-linux as root, or install it)" >&2; exit 1; }
done
[ -f "$tarball" ] || { echo "guests-linux: $tarball not found (apt-get install linux-source-6.1)" >&2; exit 1; }

mkdir -p "$obj" "$kbuild" "$out"
if [ ! -f "$src/Makefile" ]; then
  echo "guests-linux: unpacking $tarball"
  tar -C "$obj" -xf "$tarball"
fi

# /init: freestanding RV64IMAC, no libc; nothing the kernel would need an FPU for.
"${cross}gcc" -march=rv64imac_zicsr_zifencei -mabi=lp64 -O2 -Wall -Wextra -Werror \
  -ffreestanding -nostdlib -static -fno-pie -no-pie -fno-stack-protector \
  -fno-asynchronous-unwind-tables -fno-unwind-tables -fno-tree-loop-distribute-patterns \
  -ffile-prefix-map="$here"=. -Wl,--build-id=none -Wl,-z,separate-code \
  -o "$obj/init.new" "$here/init.c"
# Only a changed /init touches the file the initramfs depends on.
if cmp -s "$obj/init.new" "$obj/init"; then rm "$obj/init.new"; else mv "$obj/init.new" "$obj/init"; fi

# gen_init_cpio stores a file's own mtime in the archive (its -t timestamp
# covers only directories and nodes), so pin it.
touch -d "@$SOURCE_DATE_EPOCH" "$obj/init"

# The list names files by absolute path because gen_init_cpio runs in the
# build tree; the path itself does not reach the image. /init's checksum is in
# the list because its pinned mtime would hide a change from make.
cat > "$obj/initramfs.list.new" <<LIST
# /init sha256 $(sha256sum "$obj/init" | cut -d' ' -f1)
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
file /init $obj/init 0755 0 0
LIST
if cmp -s "$obj/initramfs.list.new" "$obj/initramfs.list"; then rm "$obj/initramfs.list.new"; else mv "$obj/initramfs.list.new" "$obj/initramfs.list"; fi

kmake() {
  make -C "$src" O="$kbuild" ARCH=riscv CROSS_COMPILE="$cross" \
    KCFLAGS="-ffile-prefix-map=$src/= -ffile-prefix-map=$kbuild/=" "$@"
}

# Configure from scratch each time: the result depends only on the fragment.
kmake -s tinyconfig >/dev/null
{ cat "$here/ferry.config"; echo "CONFIG_INITRAMFS_SOURCE=\"$obj/initramfs.list\""; } > "$obj/fragment.config"
(cd "$kbuild" && "$src/scripts/kconfig/merge_config.sh" -m -O "$kbuild" .config "$obj/fragment.config" >/dev/null)
kmake -s olddefconfig >/dev/null
# merge_config only warns when Kconfig drops a requested value; here that is an error.
missing=0
while IFS= read -r line; do
  case "$line" in
    # An option whose dependencies are off is absent, which is "n" too.
    CONFIG_*=n) grep -q "^${line%=n}=" "$kbuild/.config" || continue; want="# ${line%=n} is not set" ;;
    CONFIG_*) want="$line" ;;
    *) continue ;;
  esac
  if ! grep -qxF -- "$want" "$kbuild/.config"; then
    echo "guests-linux: config fragment value not honoured: $line" >&2; missing=1
  fi
done < "$obj/fragment.config"
[ "$missing" -eq 0 ] || exit 1

kmake -j"$jobs" Image

image="$kbuild/arch/riscv/boot/Image"
new_sum="$(sha256sum "$image" | cut -d' ' -f1)"
toolchain="$({ "${cross}gcc" --version | head -n 1; "${cross}ld" --version | head -n 1;
  dpkg-query -W -f='linux-source-6.1 ${Version}\n' linux-source-6.1 2>/dev/null || echo "linux-source-6.1 (version unknown)"; })"
old_sum=""
[ -f "$out/SHA256SUMS" ] && old_sum="$(awk '$2 == "Image" {print $1}' "$out/SHA256SUMS")"

if [ -n "$old_sum" ] && [ "$old_sum" = "$new_sum" ]; then
  cp "$image" "$out/Image"
  echo "guests-linux: Image matches its committed SHA-256 ($new_sum)"
elif [ -z "$old_sum" ] || [ "${LINUX_UPDATE:-0}" = 1 ]; then
  cp "$image" "$out/Image"
  (cd "$out" && sha256sum Image > SHA256SUMS)
  echo "$toolchain" > "$out/TOOLCHAIN"
  echo "guests-linux: wrote $out/Image ($(stat -c %s "$image") bytes, sha256 $new_sum)"
else
  echo "guests-linux: the rebuilt Image ($new_sum) differs from the committed one ($old_sum)." >&2
  echo "guests-linux: built with:" >&2; echo "$toolchain" | sed 's/^/  /' >&2
  echo "guests-linux: committed images were built with:" >&2; sed 's/^/  /' "$out/TOOLCHAIN" >&2 || true
  echo "guests-linux: if you changed guests/linux/, rerun with LINUX_UPDATE=1 and commit the new Image" >&2
  exit 1
fi
