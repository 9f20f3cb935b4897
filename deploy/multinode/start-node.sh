#!/usr/bin/env bash
# Start one node of a multi-node Ray cluster for pdserve, by hand.
#
#   head:    deploy/multinode/start-node.sh head   {cpu|gpu|npu}
#   worker:  RAY_HEAD=10.0.0.1:6379 RAY_AUTH_TOKEN=<token> deploy/multinode/start-node.sh worker {cpu|gpu|npu}
#   then on the head:  pdserve up -c deploy/topologies/gpu-xpyd.yaml --address auto --detach
#
# Ray 2.60 authenticates every cluster RPC with a shared token. The head generates one
# (`ray get-auth-token --generate`, stored in ~/.ray/auth_token) and prints it; every worker
# must be started with the same token in RAY_AUTH_TOKEN (or a file in RAY_AUTH_TOKEN_PATH)
# and RAY_AUTH_MODE=token, or its raylet cannot register with the GCS. The accelerator
# environment is exported BEFORE `ray start`: the raylet and every actor it forks inherit it.
#
# The address a node advertises: NODE_IP if set, else the source address of the route to the
# head (worker) or of the default route (head). Ray's own guess probes 8.8.8.8 and, on a
# network without a default route, falls back to 127.0.0.1: no other node could then reach it.
set -euo pipefail

role="${1:?usage: start-node.sh head|worker cpu|gpu|npu}"
accel="${2:-cpu}"
port="${RAY_PORT:-6379}"
export RAY_AUTH_MODE=token

# Prints the source address the kernel would use towards $1 (no packet is sent).
route_src() {
  ip -4 route get "$1" 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n1
}

node_ip() {
  local target="$1" ip="${NODE_IP:-}"
  if [[ -z "$ip" ]]; then
    ip="$(route_src "$target")"
  fi
  if [[ -z "$ip" || "$ip" == 127.* ]]; then
    echo "cannot tell which address this node should advertise (no route to $target); set NODE_IP=<this node's address>" >&2
    exit 2
  fi
  echo "$ip"
}

case "$accel" in
  cpu)
    resources=()
    ;;
  gpu)
    # Ray detects NVIDIA GPUs itself and sets CUDA_VISIBLE_DEVICES per actor.
    export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-eth0}"
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-eth0}"
    resources=()
    ;;
  npu)
    # Ascend: source the CANN toolkit, name the NICs HCCL/GLOO use, and make every NPU of the
    # node visible to the raylet; Ray then hands each actor its "NPU" devices through
    # ASCEND_RT_VISIBLE_DEVICES (do not set RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES).
    if [[ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ]]; then
      # shellcheck disable=SC1091
      source /usr/local/Ascend/ascend-toolkit/set_env.sh
    fi
    nic="${NIC:-eth0}"
    export HCCL_IF_IP="${HCCL_IF_IP:-$(ip -4 -o addr show "$nic" | awk '{print $4}' | cut -d/ -f1)}"
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$nic}"
    export TP_SOCKET_IFNAME="${TP_SOCKET_IFNAME:-$nic}"
    export HCCL_SOCKET_IFNAME="${HCCL_SOCKET_IFNAME:-$nic}"
    npus="$(ls /dev/davinci[0-9]* 2>/dev/null | wc -l)"
    export ASCEND_RT_VISIBLE_DEVICES="${ASCEND_RT_VISIBLE_DEVICES:-$(seq -s, 0 $((npus - 1)))}"
    # Ray's own detection globs /dev/davinci? (one digit); declare the count explicitly.
    resources=("\"NPU\": ${npus}")
    ;;
  *)
    echo "unknown accelerator $accel (cpu|gpu|npu)" >&2
    exit 2
    ;;
esac

# NODE_RESOURCES='{"prefill_node": 1}' adds custom Ray resources, so a topology can place a
# pool on this node (resources.custom in the topology).
extra="${NODE_RESOURCES:-}"
extra="${extra#\{}"
extra="${extra%\}}"
if [[ -n "${extra// /}" ]]; then
  resources+=("$extra")
fi
resource_args=()
if ((${#resources[@]})); then
  joined="$(IFS=,; echo "${resources[*]}")"
  resource_args=(--resources "{${joined}}")
fi

case "$role" in
  head)
    ip="$(node_ip 1.1.1.1)"
    ray get-auth-token --generate >/dev/null
    echo "cluster token (give it to every worker as RAY_AUTH_TOKEN):" >&2
    # `ray get-auth-token` ends without a newline: the token would run into ray's own output.
    echo "$(ray get-auth-token)"
    ray start --head --node-ip-address="$ip" --port="$port" --dashboard-host=127.0.0.1 --metrics-export-port=8080 "${resource_args[@]}"
    ;;
  worker)
    : "${RAY_HEAD:?set RAY_HEAD=<head-ip>:${port}}"
    if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -f "$HOME/.ray/auth_token" ]]; then
      echo "set RAY_AUTH_TOKEN to the head's token (printed by the head, or \`ray get-auth-token\` there)" >&2
      exit 2
    fi
    ip="$(node_ip "${RAY_HEAD%:*}")"
    ray start --address="$RAY_HEAD" --node-ip-address="$ip" --metrics-export-port=8080 "${resource_args[@]}"
    ;;
  *)
    echo "unknown role $role (head|worker)" >&2
    exit 2
    ;;
esac
