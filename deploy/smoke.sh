#!/usr/bin/env bash
# Container smoke test: build the image with podman from a Debian bookworm base made locally
# (debootstrap + `podman import`: no registry needed), run the CPU variant serving the demo
# model, and check /health, /ready, one chat completion, one structured (JSON schema) reply, the
# playground at /ui/ on 127.0.0.1, and that the image holds vllm-router (the compose profile's).
#
#   sudo deploy/smoke.sh            # about 3-5 minutes cold; the base image is reused afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${SMOKE_WORK:-/tmp/mixtral-smoke}
PORT=${SMOKE_PORT:-18080}
BASE=localhost/mixtral-smoke-base:bookworm
IMAGE=localhost/mixtral-server:cpu-smoke
NAME=mixtral-smoke
log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

for tool in podman runc debootstrap curl; do
    if ! command -v "$tool" >/dev/null; then
        log "installing podman, runc, debootstrap, curl"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap curl
        break
    fi
done

mkdir -p "$WORK"
# Debian's crun refuses this machine's hybrid cgroup layout, and raising rlimits is not allowed.
cat > "$WORK/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=20000:20000"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_CONF="$WORK/containers.conf"

if ! podman image exists "$BASE"; then
    log "debootstrap bookworm (python3, venv, CA certificates)"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
    # Outbound TLS goes through a proxy whose CA the host trusts: the image must trust it too.
    cp /usr/local/share/ca-certificates/*.crt "$WORK/rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
    chroot "$WORK/rootfs" update-ca-certificates >/dev/null
    tar -C "$WORK/rootfs" -c . | podman import - "$BASE" >/dev/null
fi

# The CPU torch wheel this machine keeps on disk; elsewhere pip fetches TORCH_SPEC itself.
cp /opt/wheels/torch-2.13.0+cpu-*.whl deploy/wheels/ 2>/dev/null || true
log "building $IMAGE"
podman build --quiet --network host --format docker \
    --build-arg BASE_IMAGE="$BASE" \
    --build-arg TORCH_SPEC=torch==2.13.0 \
    --build-arg CPU_TOOLCHAIN=1 \
    --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    -t "$IMAGE" . >"$WORK/build.log"

cleanup() { podman rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup
log "running $IMAGE on 127.0.0.1:$PORT"
podman run -d --name "$NAME" --network host -e MIXTRAL_HOST=127.0.0.1 -e MIXTRAL_PORT="$PORT" "$IMAGE" >/dev/null

for _ in $(seq 1 300); do
    if curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1; then break; fi
    if [ "$(podman inspect -f '{{.State.Running}}' "$NAME")" != "true" ]; then
        podman logs "$NAME" | tail -30; log "FAIL: the container exited"; exit 1
    fi
    sleep 1
done
curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null
log "ready; asking the demo model a question"
reply=$(curl -fsS "http://127.0.0.1:$PORT/v1/chat/completions" -H "Content-Type: application/json" \
    -d '{"model": "demo", "temperature": 0, "max_tokens": 24,
         "messages": [{"role": "user", "content": "What is the capital of France?"}]}')
echo "$reply"
podman logs "$NAME" 2>&1 | grep -m1 "mixtral-server is ready at" || true
echo "$reply" | grep -q 'Paris' || { log "FAIL: no Paris in the reply"; exit 1; }
log "the image compiled the native CPU decode step (g++ from CPU_TOOLCHAIN)"
podman logs "$NAME" 2>&1 | grep -m1 "CPU decode: " || true
podman logs "$NAME" 2>&1 | grep -q "CPU decode: the native step" \
    || { log "FAIL: the container runs the torch step (see its log for why)"; exit 1; }
log "structured output in the image (llguidance): a JSON schema reply"
structured=$(curl -fsS "http://127.0.0.1:$PORT/v1/chat/completions" -H "Content-Type: application/json" \
    -d '{"model": "demo", "temperature": 0, "max_tokens": 48,
         "messages": [{"role": "user", "content": "The capital of France, as JSON."}],
         "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": {
           "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
           "required": ["city"], "additionalProperties": false}}}}')
echo "$structured"
echo "$structured" | python3 -c '
import json, sys
choice = json.load(sys.stdin)["choices"][0]
assert choice["finish_reason"] == "stop" and set(json.loads(choice["message"]["content"])) == {"city"}
' || { log "FAIL: the structured reply does not match its schema"; exit 1; }
log "the playground is in the image, with its Content-Security-Policy"
curl -fsS -D - -o /dev/null "http://127.0.0.1:$PORT/ui/" | grep -qi "^content-security-policy: default-src 'none'" \
    || { log "FAIL: no playground at /ui/"; exit 1; }
curl -fsS -o /dev/null "http://127.0.0.1:$PORT/ui/app.js" || { log "FAIL: the playground's script is missing"; exit 1; }
log "the router the compose profile runs is in the image"
podman run --rm --network host --entrypoint vllm-router "$IMAGE" --help | grep -q -- "--health-check-endpoint" \
    || { log "FAIL: vllm-router is not in the image"; exit 1; }
log "PASS"
