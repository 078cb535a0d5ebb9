#!/usr/bin/env bash
# Installs what the mesh needs from Debian, idempotently, on a fresh Debian 12 machine (as root):
# the kernel networking tools, bcc and clang for the eBPF capture, the load generators used by the
# benchmarks, the Prometheus server (each local cluster runs its own, in its underlay namespace), the
# reference CNI plugins (/usr/lib/cni: bridge, host-local, loopback) that the mesh's own plugin is chained
# after, headless Chromium (the dashboard's browser test drives it over the DevTools protocol), and, when
# the running kernel ships no headers of its own, Debian's headers linked in as that kernel's build
# directory so that bcc can compile its programs.
set -euo pipefail

PACKAGES=(iptables iproute2 procps psmisc curl python3 python3-venv python3-dev
          python3-bpfcc bpfcc-tools bpftool clang nftables tcpdump wrk nghttp2-client openssl iputils-ping
          containernetworking-plugins prometheus chromium fonts-dejavu-core)

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-system: must run as root (it installs Debian packages and links kernel headers)" >&2
    exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# kubectl renders daemonset/ (kubectl kustomize) in the tests: Debian's kubernetes-client, unless a kubectl
# is already installed (another package's kubectl owns /usr/bin/kubectl, and any kustomize since v2 will do).
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup-system: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Kernel headers for bcc. A kernel that has /lib/modules/<release>/build or /sys/kernel/kheaders.tar.xz
# needs nothing; otherwise link Debian's newest amd64 headers as that kernel's build and source trees.
# The uapi used by tc, cgroup and sock_ops programs is stable, so a different minor version compiles.
release=$(uname -r)
moddir=/lib/modules/$release
if [ ! -e /sys/kernel/kheaders.tar.xz ] && { [ ! -e "$moddir/build" ] || [ ! -e "$moddir/source/include/linux/kconfig.h" ]; }; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$hdr" ]; then
        echo "setup-system: kernel $release has no headers; installing Debian's linux-headers-amd64 for bcc"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends linux-headers-amd64 >/dev/null
        hdr=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
    fi
    # Debian splits the headers: <ver>-amd64 holds the generated files and <ver>-common the sources.
    common=${hdr%-amd64}-common
    [ -d "$common" ] || common=$hdr
    mkdir -p "$moddir"
    ln -sfn "$hdr" "$moddir/build"
    ln -sfn "$common" "$moddir/source"
    echo "setup-system: linked $hdr as $moddir/build for bcc"
fi
