#!/bin/bash
# Build the dom0 root filesystem and disk image of the real-Xen test lab.
#
# Run by tests/xen/run.py (never by hand needed), as root, inside a private
# mount namespace (unshare -m) so that the chroot's mounts vanish with it.
# Every input comes from the environment; the hash of this file is part of
# the image cache key, so editing it forces a rebuild.
#
#   OUT          output directory (must exist, empty): receives rootfs.img,
#                xen, vmlinuz, initrd.img, packages.txt
#   WORK         scratch directory (rootfs/ is built there)
#   SUITE        Debian suite to bootstrap (bookworm)
#   MIRROR       mirror URL for debootstrap, read from the host's apt config
#   KEYRING      keyring file for debootstrap (may be empty)
#   APT_SOURCES  deb822 sources file to install as the chroot's apt config
#   APT_CONF_DIR directory of apt.conf.d snippets to copy (may be empty)
#   APT_KEYS     newline-separated keyring files to copy into the chroot
#   DEB_CACHE    persistent directory for downloaded .deb files
#   BASE_PKGS    comma-separated packages for debootstrap --include
#   PACKAGES     space-separated packages installed in the chroot with apt-get
#   IMAGE_DIR    directory holding the files baked into the image
#   WHEELS       directory of pure-Python wheels unpacked into dist-packages (may be empty)
#   HEADROOM_MB  free space left in the image
set -euo pipefail

: "${OUT:?}" "${WORK:?}" "${SUITE:?}" "${MIRROR:?}" "${APT_SOURCES:?}" "${DEB_CACHE:?}"
: "${BASE_PKGS:?}" "${PACKAGES:?}" "${IMAGE_DIR:?}" "${HEADROOM_MB:=1024}"

export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true
R="$WORK/rootfs"
T0=$(date +%s)
stage() { echo "[build +$(( $(date +%s) - T0 ))s] $*"; }

stage "debootstrap $SUITE from $MIRROR"
mkdir -p "$R" "$DEB_CACHE"
keyring_opt=()
[ -n "${KEYRING:-}" ] && keyring_opt=(--keyring="$KEYRING")
debootstrap --arch=amd64 --variant=minbase --merged-usr \
    --cache-dir="$DEB_CACHE" "${keyring_opt[@]}" \
    --include="$BASE_PKGS" "$SUITE" "$R" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -n 40 "$WORK/debootstrap.log"; [ -f "$R/debootstrap/debootstrap.log" ] \
         && tail -n 40 "$R/debootstrap/debootstrap.log"; exit 1; }

stage "apt configuration from the host"
rm -f "$R/etc/apt/sources.list"
install -m 0644 "$APT_SOURCES" "$R/etc/apt/sources.list.d/host.sources"
if [ -n "${APT_CONF_DIR:-}" ] && [ -d "$APT_CONF_DIR" ]; then
    cp -a "$APT_CONF_DIR"/. "$R/etc/apt/apt.conf.d/"
fi
while IFS= read -r key; do
    [ -n "$key" ] || continue
    [ -e "$R$key" ] || { mkdir -p "$R$(dirname "$key")"; cp -L "$key" "$R$key"; }
done <<< "${APT_KEYS:-}"
cat > "$R/etc/apt/apt.conf.d/99pyxen9p" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF
# Services must not start inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"
chmod 0755 "$R/usr/sbin/policy-rc.d"

mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount --bind /dev "$R/dev"
mount -t devpts devpts "$R/dev/pts" -o newinstance,ptmxmode=0666 || true
mkdir -p "$R/var/cache/apt/archives"
mount --bind "$DEB_CACHE" "$R/var/cache/apt/archives"

stage "apt-get install $PACKAGES"
chroot "$R" apt-get -q update > "$WORK/apt.log" 2>&1 || { tail -n 40 "$WORK/apt.log"; exit 1; }
# shellcheck disable=SC2086
chroot "$R" apt-get -q -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    install $PACKAGES >> "$WORK/apt.log" 2>&1 || { tail -n 60 "$WORK/apt.log"; exit 1; }
chroot "$R" dpkg-query -W -f '${Package} ${Version}\n' > "$OUT/packages.txt"
if [ -n "${WHEELS:-}" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
    stage "wheels: $(cd "$WHEELS" && echo *.whl)"
    purelib=$(chroot "$R" python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    mkdir -p "$R$purelib" "$R/tmp/wheels"
    cp "$WHEELS"/*.whl "$R/tmp/wheels/"
    for whl in "$R"/tmp/wheels/*.whl; do
        chroot "$R" python3 -m zipfile -e "/tmp/wheels/${whl##*/}" "$purelib"
    done
    rm -rf "$R/tmp/wheels"
    chroot "$R" python3 -c 'import mfusepy' || { echo "mfusepy does not import"; exit 1; }
    echo "$(cd "$WHEELS" && ls *.whl)" >> "$OUT/packages.txt"
fi
umount "$R/var/cache/apt/archives"
umount "$R/dev/pts" 2>/dev/null || true
umount "$R/dev" "$R/sys" "$R/proc"
rm -f "$R/usr/sbin/policy-rc.d"
rm -rf "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/*.bin "$R"/var/cache/apt/archives/*.deb

stage "configure dom0"
echo pyxen9p-dom0 > "$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 pyxen9p-dom0\n' > "$R/etc/hosts"
printf '/dev/vda / ext4 rw,noatime 0 1\n' > "$R/etc/fstab"
passwd -R "$R" -d root > /dev/null
install -m 0755 "$IMAGE_DIR/pyxen9p-guest-boot" "$R/usr/local/sbin/pyxen9p-guest-boot"
install -m 0644 "$IMAGE_DIR/pyxen9p-guest.service" "$R/etc/systemd/system/pyxen9p-guest.service"
install -m 0644 "$IMAGE_DIR/modules-load.conf" "$R/etc/modules-load.d/pyxen9p.conf"
install -m 0644 "$IMAGE_DIR/xen-default" "$R/etc/default/xen"
mkdir -p "$R/var/log/xen/console"
ln -sf /etc/systemd/system/pyxen9p-guest.service \
    "$R/etc/systemd/system/multi-user.target.wants/pyxen9p-guest.service"
# Nothing else should compete for the console or the (emulated) CPUs.
for unit in serial-getty@hvc0.service serial-getty@ttyS0.service getty@tty1.service \
        getty.target apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
        e2scrub_reap.service fstrim.timer man-db.timer systemd-timesyncd.service \
        xendomains.service xen-watchdog.service systemd-networkd-wait-online.service; do
    ln -sf /dev/null "$R/etc/systemd/system/$unit"
done
# Store journal in memory only: the root disk is a throw-away snapshot anyway.
mkdir -p "$R/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' > "$R/etc/systemd/journald.conf.d/pyxen9p.conf"
mkdir -p "$R/srv/share" "$R/mnt/pyxen9p-src" "$R/mnt/pyxen9p-results"

stage "extract xen, dom0 kernel and initrd"
xen_gz=$(ls "$R"/boot/xen-4.17-amd64.gz 2>/dev/null || ls "$R"/boot/xen-*.gz | sort -V | tail -n 1)
gzip -dc "$xen_gz" > "$OUT/xen"
kernel=$(ls "$R"/boot/vmlinuz-* | sort -V | tail -n 1)
kver=${kernel##*/vmlinuz-}
cp "$kernel" "$OUT/vmlinuz"
cp "$R/boot/initrd.img-$kver" "$OUT/initrd.img"
echo "$kver" > "$OUT/kernel-version"

stage "mkfs.ext4 -d"
used_mb=$(du -s -B1M "$R" | cut -f1)
size_mb=$(( used_mb + used_mb / 5 + HEADROOM_MB ))
mkfs.ext4 -q -F -L pyxen9p-dom0 -E root_owner=0:0 -d "$R" "$OUT/rootfs.img" "${size_mb}M"
rm -rf "$R"
stage "image done: ${size_mb} MiB, kernel $kver"
