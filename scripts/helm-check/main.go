// Command helm-check validates manifests rendered from the spire-healer Helm
// chart (deploy/helm/spire-healer), offline:
//
//   - every document decodes strictly (unknown fields and wrong types are
//     errors) into its Kubernetes type from k8s.io/api, or into the fields of
//     the Prometheus Operator CRDs the chart uses; any other kind, and any
//     ClusterRole or ClusterRoleBinding, is an error;
//   - the pods run as non-root, with a read-only root filesystem, no
//     privilege escalation, every capability dropped, seccomp RuntimeDefault,
//     resources, liveness on /healthz and readiness on /readyz, hostPath
//     mounted read-only, and a service account token only when RBAC grants
//     something;
//   - each role's configuration (the ConfigMap's <role>.toml) parses as TOML,
//     names its role, listens on the container port and holds no database URL;
//   - RBAC is namespaced and exactly what the configuration implies: the
//     cluster role's pod rules in each namespace of `[kubernetes] namespaces`
//     and nowhere else, the Lease rule (create, and get and update of that one Lease) in the release namespace for the lease
//     backend only, the node role bound to nothing unless its configuration
//     has `[kubernetes]`; no wildcard, no other resource;
//   - references resolve: service accounts, ConfigMap keys, Roles, and the
//     Service and PodDisruptionBudget selectors.
//
// Usage: helm-check -namespace NS [-expect Kind=N,…] FILE
//
// Problems are printed one per line; the exit status is 1 if there is any,
// 2 on a usage or read error.
package main

import (
	"flag"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"
)

// head is what every document must have before it can be decoded.
type head struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"metadata"`
}

// serviceMonitor holds the monitoring.coreos.com/v1 ServiceMonitor fields
// the chart writes; decoding strictly into it catches misspelt fields.
type serviceMonitor struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
	Spec       struct {
		JobLabel          string   `json:"jobLabel"`
		PodTargetLabels   []string `json:"podTargetLabels"`
		NamespaceSelector struct {
			MatchNames []string `json:"matchNames"`
		} `json:"namespaceSelector"`
		Selector  metav1.LabelSelector `json:"selector"`
		Endpoints []struct {
			Port          string `json:"port"`
			Path          string `json:"path"`
			Interval      string `json:"interval"`
			ScrapeTimeout string `json:"scrapeTimeout"`
		} `json:"endpoints"`
	} `json:"spec"`
}

// prometheusRule holds the monitoring.coreos.com/v1 PrometheusRule fields.
type prometheusRule struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
	Spec       struct {
		Groups []struct {
			Name     string `json:"name"`
			Interval string `json:"interval,omitempty"`
			Rules    []struct {
				Record      string            `json:"record,omitempty"`
				Alert       string            `json:"alert,omitempty"`
				Expr        string            `json:"expr"`
				For         string            `json:"for,omitempty"`
				Labels      map[string]string `json:"labels,omitempty"`
				Annotations map[string]string `json:"annotations,omitempty"`
			} `json:"rules"`
		} `json:"groups"`
	} `json:"spec"`
}

// roleConfig is the part of a role's TOML file the checks look at.
type roleConfig struct {
	Role string `toml:"role"`
	HTTP struct {
		Listen string `toml:"listen"`
	} `toml:"http"`
	Database   map[string]any `toml:"database"`
	Kubernetes *struct {
		Namespaces []string `toml:"namespaces"`
	} `toml:"kubernetes"`
	Leadership *struct {
		Backend   string `toml:"backend"`
		Name      string `toml:"name"`
		Namespace string `toml:"namespace"`
	} `toml:"leadership"`
	PolicyFile string `toml:"policy_file"`
}

// render is everything decoded from one file.
type render struct {
	kinds       map[string]int
	sas         map[string]*corev1.ServiceAccount // namespace/name
	configMaps  map[string]*corev1.ConfigMap
	secrets     map[string]*corev1.Secret
	services    []*corev1.Service
	daemonSets  []*appsv1.DaemonSet
	deployments []*appsv1.Deployment
	pdbs        []*policyv1.PodDisruptionBudget
	roles       map[string]*rbacv1.Role // namespace/name
	bindings    []*rbacv1.RoleBinding
	monitors    []*serviceMonitor
	rules       []*prometheusRule
}

type checker struct {
	problems []string
}

func (c *checker) errorf(format string, args ...any) {
	c.problems = append(c.problems, fmt.Sprintf(format, args...))
}

func main() {
	namespace := flag.String("namespace", "", "the release namespace the manifests were rendered for")
	expect := flag.String("expect", "", "comma-separated Kind=N counts the render must hold exactly, e.g. DaemonSet=1,Role=2")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: helm-check -namespace NS [-expect Kind=N,...] FILE\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if *namespace == "" || flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	file := flag.Arg(0)
	data, err := os.ReadFile(file)
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		os.Exit(2)
	}
	want, err := parseExpect(*expect)
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: -expect: %v\n", err)
		os.Exit(2)
	}

	c := &checker{}
	r := c.decode(data)
	c.checkKinds(r, want)
	c.checkNamespaces(r, *namespace)
	configs := c.checkConfigs(r)
	c.checkWorkloads(r, configs)
	c.checkRBAC(r, *namespace, configs)
	c.checkSelectors(r)

	if len(c.problems) > 0 {
		sort.Strings(c.problems)
		for _, p := range c.problems {
			fmt.Printf("%s: %s\n", file, p)
		}
		os.Exit(1)
	}
	var summary []string
	for k, n := range r.kinds {
		summary = append(summary, fmt.Sprintf("%s=%d", k, n))
	}
	sort.Strings(summary)
	fmt.Printf("%s: ok (%s)\n", file, strings.Join(summary, ","))
}

func parseExpect(s string) (map[string]int, error) {
	want := map[string]int{}
	if s == "" {
		return want, nil
	}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		n, err := strconv.Atoi(v)
		if !ok || err != nil || n < 0 {
			return nil, fmt.Errorf("%q is not Kind=N", kv)
		}
		want[k] = n
	}
	return want, nil
}

var docSep = regexp.MustCompile(`(?m)^---\s*$`)

// decode splits the stream into documents and decodes each strictly.
func (c *checker) decode(data []byte) *render {
	r := &render{
		kinds:      map[string]int{},
		sas:        map[string]*corev1.ServiceAccount{},
		configMaps: map[string]*corev1.ConfigMap{},
		secrets:    map[string]*corev1.Secret{},
		roles:      map[string]*rbacv1.Role{},
	}
	for i, doc := range docSep.Split(string(data), -1) {
		if isEmpty(doc) {
			continue
		}
		var h head
		if err := yaml.Unmarshal([]byte(doc), &h); err != nil {
			c.errorf("document %d does not parse as YAML: %v", i, err)
			continue
		}
		where := fmt.Sprintf("%s %s/%s", h.Kind, h.Metadata.Namespace, h.Metadata.Name)
		if h.Kind == "" || h.APIVersion == "" {
			c.errorf("document %d has no kind or apiVersion", i)
			continue
		}
		if errs := validation.IsDNS1123Subdomain(h.Metadata.Name); len(errs) > 0 {
			c.errorf("%s: metadata.name %q: %s", where, h.Metadata.Name, strings.Join(errs, "; "))
		}
		r.kinds[h.Kind]++
		gvk := h.APIVersion + "/" + h.Kind
		strict := func(into any) bool {
			if err := yaml.UnmarshalStrict([]byte(doc), into); err != nil {
				c.errorf("%s: %v", where, err)
				return false
			}
			return true
		}
		key := h.Metadata.Namespace + "/" + h.Metadata.Name
		switch gvk {
		case "v1/ServiceAccount":
			o := &corev1.ServiceAccount{}
			if strict(o) {
				r.sas[key] = o
			}
		case "v1/ConfigMap":
			o := &corev1.ConfigMap{}
			if strict(o) {
				r.configMaps[key] = o
			}
		case "v1/Secret":
			o := &corev1.Secret{}
			if strict(o) {
				r.secrets[key] = o
			}
		case "v1/Service":
			o := &corev1.Service{}
			if strict(o) {
				r.services = append(r.services, o)
			}
		case "apps/v1/DaemonSet":
			o := &appsv1.DaemonSet{}
			if strict(o) {
				r.daemonSets = append(r.daemonSets, o)
			}
		case "apps/v1/Deployment":
			o := &appsv1.Deployment{}
			if strict(o) {
				r.deployments = append(r.deployments, o)
			}
		case "policy/v1/PodDisruptionBudget":
			o := &policyv1.PodDisruptionBudget{}
			if strict(o) {
				r.pdbs = append(r.pdbs, o)
			}
		case "rbac.authorization.k8s.io/v1/Role":
			o := &rbacv1.Role{}
			if strict(o) {
				r.roles[key] = o
			}
		case "rbac.authorization.k8s.io/v1/RoleBinding":
			o := &rbacv1.RoleBinding{}
			if strict(o) {
				r.bindings = append(r.bindings, o)
			}
		case "monitoring.coreos.com/v1/ServiceMonitor":
			o := &serviceMonitor{}
			if strict(o) {
				r.monitors = append(r.monitors, o)
			}
		case "monitoring.coreos.com/v1/PrometheusRule":
			o := &prometheusRule{}
			if strict(o) {
				r.rules = append(r.rules, o)
			}
		case "rbac.authorization.k8s.io/v1/ClusterRole", "rbac.authorization.k8s.io/v1/ClusterRoleBinding":
			c.errorf("%s: cluster-wide RBAC; the chart grants namespaced Roles only", where)
		default:
			c.errorf("%s: unexpected kind %s", where, gvk)
		}
	}
	return r
}

// isEmpty: only blank lines and comments.
func isEmpty(doc string) bool {
	for _, l := range strings.Split(doc, "\n") {
		l = strings.TrimSpace(l)
		if l != "" && !strings.HasPrefix(l, "#") {
			return false
		}
	}
	return true
}

func (c *checker) checkKinds(r *render, want map[string]int) {
	for k, n := range want {
		if r.kinds[k] != n {
			c.errorf("expected %d %s, found %d", n, k, r.kinds[k])
		}
	}
	for k, n := range r.kinds {
		if _, ok := want[k]; !ok && len(want) > 0 {
			c.errorf("expected no %s, found %d", k, n)
		}
	}
}

// checkNamespaces: every object names its namespace (plain manifests are
// applied without -n); everything but the per-namespace RBAC lives in the
// release namespace.
func (c *checker) checkNamespaces(r *render, ns string) {
	check := func(kind string, m metav1.ObjectMeta) {
		if m.Namespace == "" {
			c.errorf("%s %s: no metadata.namespace", kind, m.Name)
		} else if m.Namespace != ns {
			c.errorf("%s %s: in namespace %s, not the release namespace %s", kind, m.Name, m.Namespace, ns)
		}
	}
	for _, o := range r.sas {
		check("ServiceAccount", o.ObjectMeta)
	}
	for _, o := range r.configMaps {
		check("ConfigMap", o.ObjectMeta)
	}
	for _, o := range r.secrets {
		check("Secret", o.ObjectMeta)
	}
	for _, o := range r.services {
		check("Service", o.ObjectMeta)
	}
	for _, o := range r.daemonSets {
		check("DaemonSet", o.ObjectMeta)
	}
	for _, o := range r.deployments {
		check("Deployment", o.ObjectMeta)
	}
	for _, o := range r.pdbs {
		check("PodDisruptionBudget", o.ObjectMeta)
	}
	for _, o := range r.monitors {
		check("ServiceMonitor", o.Metadata)
	}
	for _, o := range r.rules {
		check("PrometheusRule", o.Metadata)
	}
	for _, o := range r.roles {
		if o.Namespace == "" {
			c.errorf("Role %s: no metadata.namespace", o.Name)
		}
	}
	for _, o := range r.bindings {
		if o.Namespace == "" {
			c.errorf("RoleBinding %s: no metadata.namespace", o.Name)
		}
	}
}

// checkConfigs parses every <role>.toml of every ConfigMap; the result is
// keyed by "configmap-namespace/name/key".
func (c *checker) checkConfigs(r *render) map[string]*roleConfig {
	out := map[string]*roleConfig{}
	for key, cm := range r.configMaps {
		for k, text := range cm.Data {
			if k == "policy.toml" {
				var any map[string]any
				if _, err := toml.Decode(text, &any); err != nil {
					c.errorf("ConfigMap %s key %s: not TOML: %v", key, k, err)
				}
				continue
			}
			role, ok := strings.CutSuffix(k, ".toml")
			if !ok {
				c.errorf("ConfigMap %s: unexpected key %s", key, k)
				continue
			}
			var cfg roleConfig
			if _, err := toml.Decode(text, &cfg); err != nil {
				c.errorf("ConfigMap %s key %s: not TOML: %v", key, k, err)
				continue
			}
			where := fmt.Sprintf("ConfigMap %s key %s", key, k)
			if cfg.Role != role {
				c.errorf("%s: role = %q, expected %q", where, cfg.Role, role)
			}
			if _, ok := cfg.Database["url"]; ok {
				c.errorf("%s: holds database.url (the URL belongs in a Secret)", where)
			}
			if cfg.HTTP.Listen == "" {
				c.errorf("%s: no http.listen", where)
			}
			if cfg.PolicyFile != "" {
				if _, ok := cm.Data["policy.toml"]; !ok {
					c.errorf("%s: policy_file is set but the ConfigMap has no policy.toml", where)
				}
			}
			switch role {
			case "cluster":
				if cfg.Kubernetes == nil || len(cfg.Kubernetes.Namespaces) == 0 {
					c.errorf("%s: no [kubernetes] namespaces (the allow-list)", where)
				}
				if cfg.Leadership == nil {
					c.errorf("%s: no [leadership]", where)
				} else if l := cfg.Leadership; l.Backend != "lease" && l.Backend != "postgres" {
					c.errorf("%s: leadership.backend %q", where, l.Backend)
				} else if l.Backend == "lease" && (l.Name == "" || l.Namespace == "") {
					c.errorf("%s: the lease backend needs leadership.name and leadership.namespace", where)
				}
			case "node":
				if cfg.Leadership != nil {
					c.errorf("%s: [leadership] in the node role", where)
				}
			default:
				c.errorf("%s: unknown role %q", where, role)
			}
			out[key+"/"+k] = &cfg
		}
	}
	return out
}

// podOwner is a DaemonSet or Deployment, reduced to what the checks need.
type podOwner struct {
	kind, name, namespace string
	selector              *metav1.LabelSelector
	template              corev1.PodTemplateSpec
	role                  string
}

func (r *render) owners() []podOwner {
	var out []podOwner
	for _, o := range r.daemonSets {
		out = append(out, podOwner{"DaemonSet", o.Name, o.Namespace, o.Spec.Selector, o.Spec.Template, o.Spec.Template.Labels["app.kubernetes.io/component"]})
	}
	for _, o := range r.deployments {
		out = append(out, podOwner{"Deployment", o.Name, o.Namespace, o.Spec.Selector, o.Spec.Template, o.Spec.Template.Labels["app.kubernetes.io/component"]})
	}
	return out
}

// configOf is the parsed configuration a workload mounts, if any.
func configOf(o podOwner, configs map[string]*roleConfig) *roleConfig {
	for _, v := range o.template.Spec.Volumes {
		if v.ConfigMap == nil {
			continue
		}
		for _, it := range v.ConfigMap.Items {
			if it.Path == "spire-healer.toml" {
				return configs[o.namespace+"/"+v.ConfigMap.Name+"/"+it.Key]
			}
		}
	}
	return nil
}

func (c *checker) checkWorkloads(r *render, configs map[string]*roleConfig) {
	for _, o := range r.owners() {
		where := fmt.Sprintf("%s %s", o.kind, o.name)
		spec := o.template.Spec
		if o.role != "node" && o.role != "cluster" {
			c.errorf("%s: pod label app.kubernetes.io/component %q is not a role", where, o.role)
		}
		if (o.kind == "DaemonSet") != (o.role == "node") {
			c.errorf("%s: role %s runs as a %s", where, o.role, o.kind)
		}
		if sel, err := metav1.LabelSelectorAsSelector(o.selector); err != nil || !sel.Matches(labels.Set(o.template.Labels)) {
			c.errorf("%s: the selector does not select its own pods", where)
		}
		if _, ok := o.template.Annotations["checksum/config"]; !ok {
			c.errorf("%s: no checksum/config annotation (a new configuration would not roll the pods)", where)
		}
		if spec.HostNetwork || spec.HostPID || spec.HostIPC {
			c.errorf("%s: uses the host network, PID or IPC namespace", where)
		}
		psc := spec.SecurityContext
		if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot {
			c.errorf("%s: pod securityContext.runAsNonRoot is not true", where)
		}
		if psc == nil || psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
			c.errorf("%s: pod seccompProfile is not RuntimeDefault", where)
		}
		if psc != nil && psc.RunAsUser != nil && *psc.RunAsUser == 0 {
			c.errorf("%s: runs as uid 0", where)
		}

		// Service account: exists, and holds a token only if bound.
		saKey := o.namespace + "/" + spec.ServiceAccountName
		if spec.ServiceAccountName == "" {
			c.errorf("%s: no serviceAccountName", where)
		} else if _, ok := r.sas[saKey]; !ok {
			c.errorf("%s: service account %s is not in the render", where, saKey)
		}
		bound := false
		for _, b := range r.bindings {
			for _, s := range b.Subjects {
				if s.Kind == "ServiceAccount" && s.Namespace == o.namespace && s.Name == spec.ServiceAccountName {
					bound = true
				}
			}
		}
		if spec.AutomountServiceAccountToken == nil {
			c.errorf("%s: automountServiceAccountToken is not set explicitly", where)
		} else if *spec.AutomountServiceAccountToken != bound {
			state := "bound to no Role (a token would only be a credential to steal)"
			if bound {
				state = "bound to a Role (without a token it cannot use it)"
			}
			c.errorf("%s: automountServiceAccountToken is %v, but the service account is %s", where, *spec.AutomountServiceAccountToken, state)
		}
		if sa, ok := r.sas[saKey]; ok && (sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken != bound) {
			c.errorf("ServiceAccount %s: automountServiceAccountToken should be %v", saKey, bound)
		}

		cfg := configOf(o, configs)
		if cfg == nil {
			c.errorf("%s: mounts no <role>.toml of a ConfigMap in the render as spire-healer.toml", where)
		} else if cfg.Role != o.role {
			c.errorf("%s: pods of role %s mount the configuration of role %s", where, o.role, cfg.Role)
		}

		volumes := map[string]corev1.Volume{}
		for _, v := range spec.Volumes {
			volumes[v.Name] = v
			if v.EmptyDir != nil && v.EmptyDir.SizeLimit == nil {
				c.errorf("%s: emptyDir %s has no sizeLimit", where, v.Name)
			}
			if v.ConfigMap != nil {
				cm, ok := r.configMaps[o.namespace+"/"+v.ConfigMap.Name]
				if !ok {
					c.errorf("%s: ConfigMap %s is not in the render", where, v.ConfigMap.Name)
					continue
				}
				for _, it := range v.ConfigMap.Items {
					if _, ok := cm.Data[it.Key]; !ok {
						c.errorf("%s: ConfigMap %s has no key %s", where, v.ConfigMap.Name, it.Key)
					}
				}
			}
		}
		if len(spec.Containers) == 0 {
			c.errorf("%s: no containers", where)
		}
		for _, ct := range append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...) {
			cw := fmt.Sprintf("%s container %s", where, ct.Name)
			c.checkContainer(cw, ct, cfg)
			for _, m := range ct.VolumeMounts {
				v, ok := volumes[m.Name]
				if !ok {
					c.errorf("%s: mounts volume %s, which the pod does not have", cw, m.Name)
					continue
				}
				if (v.HostPath != nil || v.CSI != nil) && !m.ReadOnly {
					c.errorf("%s: volume %s (host or CSI) is mounted writable", cw, m.Name)
				}
			}
			for _, e := range ct.Env {
				if e.Name == "SPIRE_HEALER_DATABASE_URL" && (e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil) {
					c.errorf("%s: SPIRE_HEALER_DATABASE_URL does not come from a Secret", cw)
				}
				if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
					ref := e.ValueFrom.SecretKeyRef
					if s, ok := r.secrets[o.namespace+"/"+ref.Name]; ok {
						if _, ok := s.Data[ref.Key]; !ok {
							c.errorf("%s: Secret %s has no key %s", cw, ref.Name, ref.Key)
						}
					}
				}
			}
		}
	}
}

func (c *checker) checkContainer(where string, ct corev1.Container, cfg *roleConfig) {
	if ct.Image == "" {
		c.errorf("%s: no image", where)
	}
	sc := ct.SecurityContext
	switch {
	case sc == nil:
		c.errorf("%s: no securityContext", where)
		return
	case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
		c.errorf("%s: allowPrivilegeEscalation is not false", where)
	case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
		c.errorf("%s: readOnlyRootFilesystem is not true", where)
	case sc.Privileged != nil && *sc.Privileged:
		c.errorf("%s: privileged", where)
	case sc.RunAsNonRoot != nil && !*sc.RunAsNonRoot:
		c.errorf("%s: runAsNonRoot is false", where)
	}
	if sc.Capabilities == nil || !hasAll(sc.Capabilities.Drop) {
		c.errorf("%s: capabilities do not drop ALL", where)
	} else if len(sc.Capabilities.Add) > 0 {
		c.errorf("%s: adds capabilities %v", where, sc.Capabilities.Add)
	}
	if ct.Resources.Requests.Cpu().IsZero() || ct.Resources.Requests.Memory().IsZero() {
		c.errorf("%s: no cpu and memory requests", where)
	}
	if ct.Resources.Limits.Memory().IsZero() {
		c.errorf("%s: no memory limit", where)
	}
	probe := func(name string, p *corev1.Probe, path string) {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != path {
			c.errorf("%s: no %s probe on %s", where, name, path)
		}
	}
	probe("liveness", ct.LivenessProbe, "/healthz")
	probe("readiness", ct.ReadinessProbe, "/readyz")
	if cfg != nil {
		port := cfg.HTTP.Listen[strings.LastIndex(cfg.HTTP.Listen, ":")+1:]
		found := false
		for _, p := range ct.Ports {
			if strconv.Itoa(int(p.ContainerPort)) == port && p.Name == "metrics" {
				found = true
			}
		}
		if !found {
			c.errorf("%s: no container port named metrics on %s (http.listen = %q)", where, port, cfg.HTTP.Listen)
		}
	}
}

func hasAll(caps []corev1.Capability) bool {
	for _, c := range caps {
		if c == "ALL" {
			return true
		}
	}
	return false
}

// The resources and verbs a Role may grant, per API group.
var allowed = map[string]map[string][]string{
	"":                    {"pods": {"get", "list", "watch", "delete"}, "pods/eviction": {"create"}},
	"apps":                {"deployments": {"get", "patch"}, "daemonsets": {"get", "patch"}, "statefulsets": {"get", "patch"}, "replicasets": {"get"}},
	"coordination.k8s.io": {"leases": {"get", "create", "update"}},
}

func (c *checker) checkRBAC(r *render, ns string, configs map[string]*roleConfig) {
	// Each Role: nothing beyond the allowed table, no wildcard.
	for key, role := range r.roles {
		for _, rule := range role.Rules {
			if len(rule.NonResourceURLs) > 0 {
				c.errorf("Role %s: nonResourceURLs in a Role", key)
			}
			for _, g := range rule.APIGroups {
				for _, res := range rule.Resources {
					verbs, ok := allowed[g][res]
					if !ok {
						c.errorf("Role %s: grants %q in API group %q", key, res, g)
						continue
					}
					for _, v := range rule.Verbs {
						if !contains(verbs, v) {
							c.errorf("Role %s: grants %s on %s", key, v, res)
						}
					}
					if res == "leases" && role.Namespace != ns {
						c.errorf("Role %s: Lease access outside the release namespace %s", key, ns)
					}
					if res == "leases" && len(rule.ResourceNames) == 0 {
						for _, v := range rule.Verbs {
							if v != "create" {
								c.errorf("Role %s: %s on every Lease of %s (limit it to the leader's Lease with resourceNames)", key, v, role.Namespace)
							}
						}
					}
				}
			}
		}
	}

	// Bindings: to a Role of the render in the same namespace, for service
	// accounts of the render. grants: service account -> "namespace|resource";
	// leases: service account -> "namespace|lease name".
	grants := map[string]map[string]bool{}
	leases := map[string]map[string]bool{}
	for _, b := range r.bindings {
		key := b.Namespace + "/" + b.Name
		if b.RoleRef.Kind != "Role" {
			c.errorf("RoleBinding %s: binds a %s", key, b.RoleRef.Kind)
			continue
		}
		role, ok := r.roles[b.Namespace+"/"+b.RoleRef.Name]
		if !ok {
			c.errorf("RoleBinding %s: Role %s is not in the render", key, b.RoleRef.Name)
			continue
		}
		for _, s := range b.Subjects {
			if s.Kind != "ServiceAccount" {
				c.errorf("RoleBinding %s: subject of kind %s", key, s.Kind)
				continue
			}
			if _, ok := r.sas[s.Namespace+"/"+s.Name]; !ok || s.Namespace != ns {
				c.errorf("RoleBinding %s: subject %s/%s is not a service account of the render", key, s.Namespace, s.Name)
			}
			sa := s.Namespace + "/" + s.Name
			if grants[sa] == nil {
				grants[sa] = map[string]bool{}
				leases[sa] = map[string]bool{}
			}
			for _, rule := range role.Rules {
				for _, res := range rule.Resources {
					grants[sa][b.Namespace+"|"+res] = true
					if res == "leases" {
						for _, n := range rule.ResourceNames {
							leases[sa][b.Namespace+"|"+n] = true
						}
					}
				}
			}
		}
	}

	// What each role's configuration implies, no more and no less.
	for _, o := range r.owners() {
		cfg := configOf(o, configs)
		if cfg == nil {
			continue
		}
		where := fmt.Sprintf("%s %s", o.kind, o.name)
		sa := o.namespace + "/" + o.template.Spec.ServiceAccountName
		g := grants[sa]
		want := map[string]bool{}
		if cfg.Kubernetes != nil {
			for _, n := range cfg.Kubernetes.Namespaces {
				want[n+"|pods"] = true
				if o.role == "cluster" {
					for _, res := range []string{"pods/eviction", "deployments", "daemonsets", "statefulsets", "replicasets"} {
						want[n+"|"+res] = true
					}
				}
			}
		}
		if l := cfg.Leadership; l != nil && l.Backend == "lease" {
			if l.Namespace != ns {
				c.errorf("%s: its Lease is in %s, not the release namespace %s", where, l.Namespace, ns)
			}
			want[l.Namespace+"|leases"] = true
			if !leases[sa][l.Namespace+"|"+l.Name] {
				c.errorf("%s: no Role grants get and update on its Lease %s/%s by name", where, l.Namespace, l.Name)
			}
		}
		for k := range want {
			if !g[k] {
				c.errorf("%s: its configuration needs %s, which no Role grants", where, strings.Replace(k, "|", " ", 1))
			}
		}
		for k := range g {
			if !want[k] {
				c.errorf("%s: granted %s, which its configuration does not use", where, strings.Replace(k, "|", " ", 1))
			}
		}
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func (c *checker) checkSelectors(r *render) {
	owners := r.owners()
	selects := func(sel map[string]string, o podOwner) bool {
		return len(sel) > 0 && labels.SelectorFromSet(sel).Matches(labels.Set(o.template.Labels))
	}
	for _, s := range r.services {
		for _, o := range owners {
			if !selects(s.Spec.Selector, o) {
				c.errorf("Service %s does not select the pods of %s %s", s.Name, o.kind, o.name)
			}
		}
		for _, p := range s.Spec.Ports {
			if p.TargetPort.String() != "metrics" {
				c.errorf("Service %s: port %s targets %s, not the metrics port", s.Name, p.Name, p.TargetPort.String())
			}
		}
	}
	for _, p := range r.pdbs {
		sel, err := metav1.LabelSelectorAsSelector(p.Spec.Selector)
		if err != nil {
			c.errorf("PodDisruptionBudget %s: %v", p.Name, err)
			continue
		}
		matched := 0
		for _, d := range r.deployments {
			if sel.Matches(labels.Set(d.Spec.Template.Labels)) {
				matched++
				replicas := int32(1)
				if d.Spec.Replicas != nil {
					replicas = *d.Spec.Replicas
				}
				if p.Spec.MinAvailable == nil || p.Spec.MinAvailable.IntValue() >= int(replicas) {
					c.errorf("PodDisruptionBudget %s: minAvailable %v leaves no disruption for %d replicas (a drain would hang)", p.Name, p.Spec.MinAvailable, replicas)
				}
			}
		}
		for _, d := range r.daemonSets {
			if sel.Matches(labels.Set(d.Spec.Template.Labels)) {
				c.errorf("PodDisruptionBudget %s selects the DaemonSet %s", p.Name, d.Name)
			}
		}
		if matched != 1 {
			c.errorf("PodDisruptionBudget %s selects %d Deployments, expected 1", p.Name, matched)
		}
	}
	for _, m := range r.monitors {
		sel, err := metav1.LabelSelectorAsSelector(&m.Spec.Selector)
		if err != nil {
			c.errorf("ServiceMonitor %s: %v", m.Metadata.Name, err)
			continue
		}
		found := false
		for _, s := range r.services {
			if sel.Matches(labels.Set(s.Labels)) && s.Labels[m.Spec.JobLabel] == "spire-healer" {
				found = true
			}
		}
		if !found {
			c.errorf("ServiceMonitor %s: selects no Service whose %s label is spire-healer (the job the alert rules expect)", m.Metadata.Name, m.Spec.JobLabel)
		}
		for _, e := range m.Spec.Endpoints {
			if e.Port != "metrics" || e.Path != "/metrics" {
				c.errorf("ServiceMonitor %s: endpoint %s%s is not metrics/metrics", m.Metadata.Name, e.Port, e.Path)
			}
		}
	}
	for _, pr := range r.rules {
		if len(pr.Spec.Groups) == 0 {
			c.errorf("PrometheusRule %s: no groups", pr.Metadata.Name)
		}
		for _, g := range pr.Spec.Groups {
			for _, rule := range g.Rules {
				if (rule.Alert == "") == (rule.Record == "") || rule.Expr == "" {
					c.errorf("PrometheusRule %s group %s: a rule needs one of alert or record, and expr", pr.Metadata.Name, g.Name)
				}
			}
		}
	}
}
