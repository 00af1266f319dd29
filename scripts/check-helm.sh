#!/usr/bin/env bash
# Checks the Helm chart deploy/helm/spire-healer and the plain manifests
# rendered from it:
#   1. `helm lint --strict` with the default values and with each
#      deploy/helm/spire-healer/ci/*-values.yaml (together they set every
#      option: ServiceMonitor, PrometheusRule, the postgres leadership
#      backend, the SPIFFE CSI driver, …);
#   2. `helm template` of the same, each render checked by scripts/helm-check
#      (every document decoded strictly into its k8s.io/api type, the kinds
#      and counts expected, non-root pods with read-only root filesystems and
#      no capabilities, RBAC namespaced and exactly what each role's
#      configuration needs, every reference resolved);
#   3. values the chart must refuse are refused;
#   4. the chart's PrometheusRule holds the same groups as
#      deploy/prometheus/spire-healer.prometheusrule.yaml (both come from
#      deploy/prometheus/spire-healer.rules.yaml);
#   5. deploy/kubernetes/spire-healer.yaml equals a fresh render with the
#      default values (release and namespace spire-healer).
# `scripts/check-helm.sh --update` rewrites deploy/kubernetes/spire-healer.yaml
# instead of comparing it (after changing the chart).
#
# helm is v4.3.2, built by scripts/install-k8s.sh into the folder it prints
# (cached; the first run builds the whole control plane, ~10 CPU-minutes);
# set SPIRE_HEALER_K8S_BIN to that folder to skip the script. scripts/helm-check
# is built once per source version into target/helm-check/ (Go >= 1.26).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
chart="$root/deploy/helm/spire-healer"
plain="$root/deploy/kubernetes/spire-healer.yaml"
checker_src="$root/scripts/helm-check"
release=spire-healer
namespace=spire-healer

update=no
case "${1:-}" in
  --update) update=yes ;;
  "") ;;
  *) echo "usage: $0 [--update]" >&2; exit 64 ;;
esac

say() { printf '  %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# --- helm ---------------------------------------------------------------------
if [[ -n "${SPIRE_HEALER_K8S_BIN:-}" ]]; then
  bin_dir="$SPIRE_HEALER_K8S_BIN"
else
  bin_dir="$("$root/scripts/install-k8s.sh" | tail -n 1)" || die "scripts/install-k8s.sh failed"
fi
helm="$bin_dir/helm"
[[ -x "$helm" ]] || die "$helm not found (SPIRE_HEALER_K8S_BIN or scripts/install-k8s.sh)"
"$helm" version --template '{{.Version}}' | grep -qx 'v4.3.2' \
  || die "$helm is $("$helm" version --short), expected v4.3.2"
# Helm logs (level=INFO) that files/spire-healer.rules.yaml is a symbolic
# link, on every load: that is the one-source design, not news.
quiet() { grep -v 'found symbolic link in path' || true; }

# --- the checker --------------------------------------------------------------
hash="$(cd "$checker_src" && cat go.mod go.sum ./*.go | sha256sum | cut -c1-16)"
checker="$root/target/helm-check/helm-check-$hash"
if [[ ! -x "$checker" ]]; then
  command -v go >/dev/null || die "go (>= 1.26) is required to build scripts/helm-check"
  mkdir -p "$root/target/helm-check"
  echo "building scripts/helm-check into $checker" >&2
  (cd "$checker_src" && go build -trimpath -o "$checker.tmp" .)
  mv "$checker.tmp" "$checker"
  find "$root/target/helm-check" -maxdepth 1 -name 'helm-check-*' ! -name "helm-check-$hash" -delete
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# render NAME [helm args...]: helm template into $tmp/NAME.yaml.
render() {
  local name="$1"; shift
  if ! "$helm" template "$release" "$chart" --namespace "$namespace" "$@" \
       >"$tmp/$name.yaml" 2>"$tmp/$name.err"; then
    quiet <"$tmp/$name.err" >&2
    die "helm template ($name) failed"
  fi
}

# --- 1-2. lint and render every values set -------------------------------------
base="ConfigMap=1,DaemonSet=1,Deployment=1,PodDisruptionBudget=1,ServiceAccount=2"
declare -A expect=(
  [default]="$base,Role=2,RoleBinding=2,Service=1"
  [full]="$base,Role=6,RoleBinding=6,Service=1,Secret=1,ServiceMonitor=1,PrometheusRule=1"
  [csi]="$base,Role=3,RoleBinding=3"
)
for name in default full csi; do
  args=()
  [[ $name == default ]] || args=(--values "$chart/ci/$name-values.yaml")
  [[ $name == default || -f "$chart/ci/$name-values.yaml" ]] || die "missing $chart/ci/$name-values.yaml"
  if ! "$helm" lint --strict "$chart" --namespace "$namespace" "${args[@]}" >"$tmp/lint.out" 2>&1; then
    quiet <"$tmp/lint.out" >&2
    die "helm lint --strict ($name values) failed"
  fi
  say "helm lint --strict ($name values): ok"
  render "$name" "${args[@]}"
  "$checker" -namespace "$namespace" -expect "${expect[$name]}" "$tmp/$name.yaml" \
    | sed "s|$tmp/||" || die "the $name render has problems (above)"
done
ls "$chart"/ci/*-values.yaml | while read -r f; do
  n="$(basename "$f" -values.yaml)"
  [[ -n "${expect[$n]:-}" ]] || die "$f is not checked: add it to scripts/check-helm.sh"
done

# --- 3. values the chart refuses ----------------------------------------------
refuse() { # reason helm-args...
  local reason="$1"; shift
  if "$helm" template "$release" "$chart" --namespace "$namespace" "$@" >/dev/null 2>"$tmp/refuse.err"; then
    die "helm template accepted $* ($reason)"
  fi
  say "refused $* ($reason): $(quiet <"$tmp/refuse.err" | grep -v '^$' | grep -v 'Use --debug' | tail -n 1 | sed 's/^.*execution error at ([^)]*): //')"
}
refuse "a password in a ConfigMap" --set config.database.url=postgres://u:p@db/x
refuse "the chart sets the role" --set cluster.config.role=all
refuse "the chart owns the allow-list" --set-json 'config.kubernetes={"namespaces":["kube-system"]}'
refuse "an unknown backend" --set leadership.backend=etcd
refuse "an empty allow-list" --set-json 'kubernetes.namespaces=[]'
refuse "a misspelt value" --set cluster.replica=3

# --- 4. one source of alert rules ---------------------------------------------
awk 'BEGIN{RS="\n---\n"} /\nkind: PrometheusRule\n/ {sub(/\n+$/, ""); print}' "$tmp/full.yaml" | sed -n '/^spec:/,$p' >"$tmp/rule.chart"
sed -n '/^spec:/,$p' "$root/deploy/prometheus/spire-healer.prometheusrule.yaml" >"$tmp/rule.shipped"
[[ -s "$tmp/rule.chart" ]] || die "the full render has no PrometheusRule spec"
if ! diff -u "$tmp/rule.shipped" "$tmp/rule.chart" >&2; then
  die "the chart's PrometheusRule differs from deploy/prometheus/spire-healer.prometheusrule.yaml (run scripts/prometheusrule.sh)"
fi
say "the chart's PrometheusRule holds the groups of deploy/prometheus/spire-healer.rules.yaml"

# --- 5. the plain manifests ---------------------------------------------------
{
  cat <<HEAD
# spire-healer on Kubernetes without Helm: the chart deploy/helm/spire-healer
# rendered with its default values (release and namespace $namespace) by
# \`scripts/check-helm.sh --update\`. Do not edit: change the chart and
# re-render (scripts/check-helm.sh fails while this file differs).
#
#   kubectl create namespace $namespace      # spire-system must exist too
#   kubectl -n $namespace create secret generic $release-database \\
#     --from-literal=url='postgres://spire_healer:PASSWORD@HOST:5432/spire_healer'
#   kubectl apply -f spire-healer.yaml
HEAD
  cat "$tmp/default.yaml"
} >"$tmp/plain.yaml"
if [[ $update == yes ]]; then
  mkdir -p "$(dirname "$plain")"
  cp "$tmp/plain.yaml" "$plain"
  say "wrote deploy/kubernetes/spire-healer.yaml"
elif ! diff -u "$plain" "$tmp/plain.yaml" >&2; then
  die "deploy/kubernetes/spire-healer.yaml differs from a fresh render of the chart (diff above: - committed, + rendered); run scripts/check-helm.sh --update"
else
  say "deploy/kubernetes/spire-healer.yaml equals a fresh render"
fi
echo "helm chart: all checks passed ($("$helm" version --short))"
