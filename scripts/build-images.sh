#!/usr/bin/env bash
# Builds the local images that tests and local clusters run; there is no registry to pull from.
#
#   flotilla/busybox:latest  busybox-static with a symlink per applet, /etc/passwd, /tmp
#   flotilla/echo:latest     the static `flotilla-echo` binary alone (images/echo)
#
# busybox is made with `docker import` of a root tarball, echo with `docker build` (the legacy
# builder) of a `FROM scratch` Dockerfile. An image is rebuilt only when the hash of its inputs
# differs from the one in its `io.flotilla.image.input` label.
# Starts dockerd when `docker info` fails. Idempotent.
#
# Usage: scripts/build-images.sh [--verify]
#   --verify  also runs both images once (echo answering HTTP to a busybox client on a network
#             of its own) and removes everything it created, by label.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/setup.sh
. "$root/scripts/setup.sh"

busybox_image=flotilla/busybox:latest
echo_image=flotilla/echo:latest
# Bump when the recipe below changes in a way the input hashes do not see.
recipe_version=1

log() { echo "build-images: $*" >&2; }

ensure_packages() {
    local missing=()
    dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

ensure_daemon() {
    if docker info >/dev/null 2>&1; then
        return
    fi
    log "starting dockerd (log: /var/log/dockerd.log)"
    nohup dockerd >/var/log/dockerd.log 2>&1 &
    local waited=0
    until docker info >/dev/null 2>&1; do
        if ((waited >= 30)); then
            log "dockerd did not come up within 30 s; the end of /var/log/dockerd.log:"
            tail -n 20 /var/log/dockerd.log >&2 || true
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

# The id of an image, empty when it is absent.
image_id() {
    docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true
}

# Removes the image a rebuild replaced (left untagged), unless something still uses it.
remove_replaced() {
    local old=$1 image=$2
    if [[ -n $old && $old != "$(image_id "$image")" ]]; then
        docker rmi "$old" >/dev/null 2>&1 || true
    fi
}

# The input hash recorded on an image, empty when the image is absent.
image_input() {
    docker image inspect -f '{{index .Config.Labels "io.flotilla.image.input"}}' "$1" 2>/dev/null || true
}

busybox_path() {
    local path
    path=$(dpkg -L busybox-static | grep -E '^(/usr)?/bin/busybox$' | head -n 1)
    if [[ -z $path || ! -x $path ]]; then
        log "busybox-static is installed but its binary was not found"
        exit 1
    fi
    echo "$path"
}

build_busybox() {
    local busybox input
    busybox=$(busybox_path)
    input=$( (echo "recipe $recipe_version"; sha256sum <"$busybox") | sha256sum | cut -d' ' -f1)
    if [[ $(image_input "$busybox_image") == "$input" ]]; then
        log "$busybox_image is up to date"
        return
    fi
    log "building $busybox_image"
    local old
    old=$(image_id "$busybox_image")
    local rootfs="$work/busybox"
    mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,var/tmp}
    chmod 1777 "$rootfs/tmp" "$rootfs/var/tmp"
    chmod 700 "$rootfs/root"
    cp "$busybox" "$rootfs/bin/busybox"
    local applet
    while IFS= read -r applet; do
        [[ -n $applet && $applet != bin/busybox ]] || continue
        mkdir -p "$rootfs/$(dirname "$applet")"
        ln -sf /bin/busybox "$rootfs/$applet"
    done < <("$busybox" --list-full)
    cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
    cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
    tar -C "$rootfs" --numeric-owner --owner=0 --group=0 -cf - . |
        docker import \
            --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["/bin/sh"]' \
            --change 'LABEL io.flotilla.image=1' \
            --change "LABEL io.flotilla.image.input=$input" \
            - "$busybox_image" >/dev/null
    remove_replaced "$old" "$busybox_image"
}

build_echo() {
    log "building the static flotilla-echo binary"
    (
        cd "$root"
        RUSTFLAGS='-C target-feature=+crt-static' \
            cargo build --quiet --release -p flotilla-echo --target x86_64-unknown-linux-gnu
    )
    local binary="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/flotilla-echo"
    if readelf -l "$binary" | grep -q INTERP; then
        log "$binary is dynamically linked; a scratch image needs a static binary"
        exit 1
    fi
    local input
    input=$( (echo "recipe $recipe_version"; sha256sum <"$binary") | sha256sum | cut -d' ' -f1)
    if [[ $(image_input "$echo_image") == "$input" ]]; then
        log "$echo_image is up to date"
        return
    fi
    log "building $echo_image"
    local old
    old=$(image_id "$echo_image")
    local context="$work/echo"
    mkdir -p "$context"
    cp "$binary" "$context/flotilla-echo"
    cat >"$context/Dockerfile" <<EOF
FROM scratch
COPY flotilla-echo /flotilla-echo
ENV PORT=8080
EXPOSE 8080
# The server is stateless and, being std only, has no signal handler: as PID 1 it would ignore
# SIGTERM and make every stop wait out the grace period, so it is stopped by SIGKILL at once.
STOPSIGNAL SIGKILL
LABEL io.flotilla.image=1 io.flotilla.image.input=$input
ENTRYPOINT ["/flotilla-echo"]
EOF
    # The legacy builder: Debian's docker.io comes without BuildKit (buildx).
    if ! DOCKER_BUILDKIT=0 docker build --quiet --force-rm -t "$echo_image" "$context" \
        >/dev/null 2>"$work/echo-build.log"; then
        cat "$work/echo-build.log" >&2
        exit 1
    fi
    remove_replaced "$old" "$echo_image"
}

# Runs both images once on a network of their own; removes all it made, by label.
verify_label="io.flotilla.image.verify=$$"
cleanup_verify() {
    docker ps -aq --filter "label=$verify_label" | xargs -r docker rm -f >/dev/null 2>&1 || true
    docker network ls -q --filter "label=$verify_label" | xargs -r docker network rm >/dev/null 2>&1 || true
}
verify() {
    local label=$verify_label
    local network="flt-image-verify-$$"
    local server="flt-image-verify-echo-$$"
    trap 'cleanup_verify; rm -rf "$work"' EXIT

    local said
    said=$(docker run --rm --label "$label" "$busybox_image" sh -c 'echo ok')
    [[ $said == ok ]] || { log "verify: busybox said '$said', not 'ok'"; exit 1; }

    docker network create --label "$label" "$network" >/dev/null
    docker run -d --label "$label" --name "$server" --hostname echo-verify --network "$network" "$echo_image" >/dev/null
    local answer
    answer=$(docker run --rm --label "$label" --network "$network" "$busybox_image" sh -c \
        "for i in \$(seq 50); do wget -q -O - http://$server:8080/ && exit 0; sleep 0.1; done; exit 1") || {
        log "verify: $echo_image did not answer; its log:"
        docker logs "$server" >&2 || true
        exit 1
    }
    [[ $answer == echo-verify ]] || { log "verify: echo answered '$answer', not 'echo-verify'"; exit 1; }
    docker rm -f "$server" >/dev/null
    cleanup_verify
    log "verify: $busybox_image runs a shell and $echo_image answers HTTP"
}

verify=false
for arg in "$@"; do
    case $arg in
    --verify) verify=true ;;
    *)
        echo "usage: $0 [--verify]" >&2
        exit 2
        ;;
    esac
done

ensure_packages
ensure_daemon
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
build_busybox
build_echo
if $verify; then
    verify
fi
