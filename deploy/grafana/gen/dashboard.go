package main

import (
	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/common"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
	"github.com/grafana/grafana-foundation-sdk/go/prometheus"
	"github.com/grafana/grafana-foundation-sdk/go/stat"
	"github.com/grafana/grafana-foundation-sdk/go/statetimeline"
	"github.com/grafana/grafana-foundation-sdk/go/timeseries"
)

// Selectors shared by the queries. `$agent` and `$trust_domain` are
// multi-value variables whose "All" is `.*`; Grafana writes several values
// as a regex alternation, so both are only used with `=~`.
const (
	agentSel = `agent=~"$agent"`
	// SPIFFE IDs of the selected trust domains.
	svidSel = `agent=~"$agent", spiffe_id=~"spiffe://($trust_domain)/.*"`
	// The healer's own scrape job, as in the alert rules.
	jobSel = `job="spire-healer"`
)

// ds is every panel's and query's datasource: the `datasource` variable.
func ds() common.DataSourceRef {
	return common.DataSourceRef{
		Type: cog.ToPtr("prometheus"),
		Uid:  cog.ToPtr("${datasource}"),
	}
}

// ids hands out panel ids (rows included) in layout order.
type ids struct{ next uint32 }

func (i *ids) id() uint32 {
	i.next++
	return i.next
}

// q is one range query with a legend.
func q(ref, expr, legend string) *prometheus.DataqueryBuilder {
	return prometheus.NewDataqueryBuilder().
		Datasource(ds()).
		RefId(ref).
		Expr(expr).
		LegendFormat(legend).
		Range()
}

// qi is one instant query (stat panels: the value now).
func qi(ref, expr, legend string) *prometheus.DataqueryBuilder {
	return prometheus.NewDataqueryBuilder().
		Datasource(ds()).
		RefId(ref).
		Expr(expr).
		LegendFormat(legend).
		Instant()
}

func ts(n *ids, title, desc, unit string, w uint32, targets ...*prometheus.DataqueryBuilder) *timeseries.PanelBuilder {
	p := timeseries.NewPanelBuilder().
		Id(n.id()).
		Title(title).
		Description(desc).
		Datasource(ds()).
		Unit(unit).
		Span(w).
		Height(8).
		FillOpacity(10).
		ShowPoints(common.VisibilityModeNever).
		Legend(common.NewVizLegendOptionsBuilder().
			DisplayMode(common.LegendDisplayModeList).
			Placement(common.LegendPlacementBottom).
			ShowLegend(true))
	for _, t := range targets {
		p.WithTarget(t)
	}
	return p
}

func st(n *ids, title, desc, unit string, w uint32, target *prometheus.DataqueryBuilder) *stat.PanelBuilder {
	return stat.NewPanelBuilder().
		Id(n.id()).
		Title(title).
		Description(desc).
		Datasource(ds()).
		Unit(unit).
		Span(w).
		Height(4).
		GraphMode(common.BigValueGraphModeNone).
		ColorMode(common.BigValueColorModeValue).
		Orientation(common.VizOrientationAuto).
		ReduceOptions(common.NewReduceDataOptionsBuilder().Calcs([]string{"lastNotNull"})).
		WithTarget(target)
}

// thresholds: green below `amber`, amber from it, red from `red`.
func thresholds(amber, red float64) *dashboard.ThresholdsConfigBuilder {
	return dashboard.NewThresholdsConfigBuilder().
		Mode(dashboard.ThresholdsModeAbsolute).
		Steps([]dashboard.Threshold{
			{Color: "green"},
			{Value: cog.ToPtr(amber), Color: "orange"},
			{Value: cog.ToPtr(red), Color: "red"},
		})
}

// upDown maps 1/0 to up/down.
func upDown(up, down string) []dashboard.ValueMapping {
	return []dashboard.ValueMapping{{
		ValueMap: &dashboard.ValueMap{
			Type: dashboard.MappingTypeValueToText,
			Options: map[string]dashboard.ValueMappingResult{
				"1": {Text: cog.ToPtr(up), Color: cog.ToPtr("green")},
				"0": {Text: cog.ToPtr(down), Color: cog.ToPtr("red")},
			},
		},
	}}
}

func timeline(n *ids, title, desc string, w uint32, mappings []dashboard.ValueMapping, target *prometheus.DataqueryBuilder) *statetimeline.PanelBuilder {
	return statetimeline.NewPanelBuilder().
		Id(n.id()).
		Title(title).
		Description(desc).
		Datasource(ds()).
		Unit("none").
		Span(w).
		Height(6).
		Mappings(mappings).
		ShowValue(common.VisibilityModeNever).
		WithTarget(target)
}

func row(n *ids, title string) *dashboard.RowBuilder {
	return dashboard.NewRowBuilder(title).Id(n.id())
}

func variables() []cog.Builder[dashboard.VariableModel] {
	all := dashboard.VariableOption{
		Selected: cog.ToPtr(true),
		Text:     dashboard.StringOrArrayOfString{String: cog.ToPtr("All")},
		Value:    dashboard.StringOrArrayOfString{String: cog.ToPtr("$__all")},
	}
	query := func(name, label, expr, regex, desc string) *dashboard.QueryVariableBuilder {
		return dashboard.NewQueryVariableBuilder(name).
			Label(label).
			Description(desc).
			Datasource(ds()).
			Query(dashboard.StringOrMap{Map: map[string]any{
				"qryType": 1,
				"query":   expr,
				"refId":   "PrometheusVariableQueryEditor-VariableQuery",
			}}).
			Definition(expr).
			Regex(regex).
			Refresh(dashboard.VariableRefreshOnTimeRangeChanged).
			Sort(dashboard.VariableSortAlphabeticalAsc).
			Multi(true).
			IncludeAll(true).
			AllValue(".*").
			Current(all)
	}
	return []cog.Builder[dashboard.VariableModel]{
		dashboard.NewDatasourceVariableBuilder("datasource").
			Label("Data source").
			Description("The Prometheus that scrapes spire-healer (job=\"spire-healer\").").
			Type("prometheus").
			Current(dashboard.VariableOption{
				Selected: cog.ToPtr(true),
				Text:     dashboard.StringOrArrayOfString{String: cog.ToPtr("default")},
				Value:    dashboard.StringOrArrayOfString{String: cog.ToPtr("default")},
			}),
		query("agent", "Agent",
			`label_values(spire_healer_workload_api_stream_up, agent)`, "",
			"Agents as named in spire-healer's config ([[agents]] name)."),
		query("trust_domain", "Trust domain",
			`label_values(spire_healer_svid_expiration_timestamp_seconds, spiffe_id)`,
			`/^spiffe:\/\/([^\/]+)\/.*$/`,
			"Trust domains of the SVIDs spire-healer watches (taken from their SPIFFE IDs)."),
	}
}

func annotations() []cog.Builder[dashboard.AnnotationQuery] {
	prom := func(name, color, expr, title, text string) *dashboard.AnnotationQueryBuilder {
		return dashboard.NewAnnotationQueryBuilder().
			Name(name).
			Datasource(ds()).
			Enable(true).
			IconColor(color).
			Expr(expr).
			Step("15s").
			TitleFormat(title).
			TextFormat(text).
			UseValueForTime(false)
	}
	return []cog.Builder[dashboard.AnnotationQuery]{
		dashboard.NewAnnotationQueryBuilder().
			Name("Annotations & Alerts").
			Datasource(common.DataSourceRef{Type: cog.ToPtr("grafana"), Uid: cog.ToPtr("-- Grafana --")}).
			Enable(true).
			Hide(true).
			IconColor("rgba(0, 211, 255, 1)").
			BuiltIn(1).
			Type("dashboard"),
		prom("Incidents opened", "red",
			`sum by (symptom) (increase(spire_healer_incidents_opened_total[$__rate_interval])) > 0`,
			"Incident opened: {{symptom}}", "{{symptom}}"),
		prom("Remediation actions", "blue",
			`sum by (actuator, outcome) (increase(spire_healer_actions_total[$__rate_interval])) > 0`,
			"Action: {{actuator}} ({{outcome}})", "{{actuator}} returned {{outcome}}"),
		prom("Alerts firing", "orange",
			`ALERTS{alertstate="firing", alertname=~"SpireHealer.*"}`,
			"Alert: {{alertname}}", "{{alertname}} firing"),
	}
}

// build lays the dashboard out row by row; the builder places panels left
// to right (widths add up to 24 per line) and rows below them.
func build() *dashboard.DashboardBuilder {
	n := &ids{}
	b := dashboard.NewDashboardBuilder("spire-healer").
		Uid("spire-healer").
		Description("Self-healing supervisor for SPIFFE/SPIRE: fleet health, SVID lifetimes, incidents and remediation, holds, handshakes, SPIRE's service levels, and the supervisor's own loop and store.").
		Tags([]string{"spire-healer", "spiffe", "spire"}).
		Refresh("30s").
		Time("now-6h", "now").
		Timezone(common.TimeZoneBrowser).
		Tooltip(dashboard.DashboardCursorSyncCrosshair).
		Variables(variables()).
		Annotations(annotations())

	// === Fleet overview ===
	b.WithRow(row(n, "Fleet overview")).
		WithPanel(st(n, "Agents healthy",
			"Agents whose Workload API streams are up and answering (of the selected agents).",
			"none", 4,
			qi("A", `sum(spire_healer_workload_api_stream_up{`+agentSel+`})`, "healthy"))).
		WithPanel(st(n, "Agents at risk",
			"Agents with at least one open incident.",
			"none", 4,
			qi("A", `spire_healer_agents_at_risk`, "at risk")).
			Thresholds(thresholds(1, 1))).
		WithPanel(st(n, "Workloads at risk",
			"SVIDs served by agents at risk, or themselves in an open incident.",
			"none", 4,
			qi("A", `spire_healer_workloads_at_risk`, "at risk")).
			Thresholds(thresholds(1, 1))).
		WithPanel(st(n, "Servers up",
			"SPIRE servers whose admin API answered the last poll.",
			"none", 4,
			qi("A", `spire_healer_servers_up`, "up"))).
		WithPanel(st(n, "Predicted outage in",
			"Time until the earliest predicted identity outage over open incidents; empty when none is predicted.",
			"s", 4,
			qi("A", `(spire_healer_predicted_outage_timestamp_seconds > 0) - time()`, "outage in")).
			NoValue("none predicted").
			Thresholds(thresholds(0, 0))).
		WithPanel(st(n, "Needs an operator",
			"Open incidents whose every remaining remediation is futile.",
			"none", 4,
			qi("A", `sum(spire_healer_incidents_needing_operator) or vector(0)`, "incidents")).
			Thresholds(thresholds(1, 1))).
		WithPanel(timeline(n, "Agent Workload API",
			"Per agent: 1 when its Workload API streams are up.",
			12, upDown("up", "down"),
			q("A", `spire_healer_workload_api_stream_up{`+agentSel+`}`, "{{agent}}"))).
		WithPanel(timeline(n, "SPIRE servers",
			"Per configured server: 1 when its admin API answers.",
			12, upDown("up", "down"),
			q("A", `spire_healer_server_up`, "{{server}}"))).
		WithPanel(ts(n, "Predicted outage per agent",
			"Time left until each agent's predicted identity outage (from its open incidents).",
			"s", 12,
			q("A", `(spire_healer_agent_predicted_outage_timestamp_seconds{`+agentSel+`} > 0) - time()`, "{{agent}}"))).
		WithPanel(ts(n, "Open incidents by symptom",
			"Incidents currently open.",
			"none", 12,
			q("A", `sum by (symptom) (spire_healer_incidents_open)`, "{{symptom}}")))

	// === SVID expiry and rotations ===
	b.WithRow(row(n, "SVID expiry and rotations")).
		WithPanel(ts(n, "SVID time left",
			"Seconds until notAfter of the soonest-expiring SVIDs (top-k).",
			"s", 12,
			q("A", `spiffe_svid_expiry_seconds{`+svidSel+`}`, "{{agent}} {{spiffe_id}}"))).
		WithPanel(ts(n, "Predicted SVID outage",
			"Time left until each SVID's predicted outage: when it expires with no rotation in sight (top-k).",
			"s", 12,
			q("A", `(spire_healer_svid_predicted_outage_timestamp_seconds{`+svidSel+`} > 0) - time()`, "{{agent}} {{spiffe_id}}"))).
		WithPanel(ts(n, "SVID rotations",
			"New serials seen for known SPIFFE IDs, per agent.",
			"none", 8,
			q("A", `sum by (agent) (increase(spiffe_certificate_rotation_total{`+agentSel+`}[$__rate_interval]))`, "{{agent}}"))).
		WithPanel(ts(n, "Agent last sync",
			"Seconds since each agent last synced with a server (agent Debug API).",
			"s", 8,
			q("A", `spire_healer_agent_last_sync_age_seconds{`+agentSel+`}`, "{{agent}}"))).
		WithPanel(ts(n, "Workload API errors",
			"Workload API errors per agent and gRPC code or transport class.",
			"none", 8,
			q("A", `sum by (agent, code) (increase(spiffe_workload_api_errors_total{`+agentSel+`}[$__rate_interval]))`, "{{agent}} {{code}}"))).
		WithPanel(ts(n, "Bundle authority time left",
			"Per server: time until the soonest X.509 authority in its bundle expires.",
			"s", 12,
			q("A", `spire_healer_bundle_authority_expiration_timestamp_seconds - time()`, "{{server}}"))).
		WithPanel(ts(n, "Agent SVID TTL",
			"The agent SVID TTL each server's agents are judged by (learned, or the policy's).",
			"s", 12,
			q("A", `spire_healer_agent_svid_ttl_seconds`, "{{server}}")))

	// === Incidents and actions ===
	b.WithRow(row(n, "Incidents and actions")).
		WithPanel(timeline(n, "Incidents",
			"Each incident's symptom and target: open (1) or closed (0).",
			24, upDown("open", "closed"),
			q("A", `max by (symptom, target, severity) (spire_healer_open_incident)`, "{{symptom}} {{target}} ({{severity}})"))).
		WithPanel(ts(n, "Incidents opened",
			"Incidents opened per symptom.",
			"none", 8,
			q("A", `sum by (symptom) (increase(spire_healer_incidents_opened_total[$__rate_interval]))`, "{{symptom}}"))).
		WithPanel(ts(n, "Actions",
			"Remediation actions per actuator and outcome.",
			"none", 8,
			q("A", `sum by (actuator, outcome) (increase(spire_healer_actions_total[$__rate_interval]))`, "{{actuator}} {{outcome}}"))).
		WithPanel(ts(n, "Verifications",
			"Verdicts on actions: verified, failed or skipped.",
			"none", 8,
			q("A", `sum by (actuator, result) (increase(spire_healer_verifications_total[$__rate_interval]))`, "{{actuator}} {{result}}")))

	// === MTTR and remediation success ===
	b.WithRow(row(n, "MTTR and remediation success")).
		WithPanel(st(n, "Mean time to recover",
			"Mean incident duration (open to close) over the dashboard's time range.",
			"s", 6,
			qi("A", `sum(increase(spire_healer_incident_duration_seconds_sum[$__range])) / sum(increase(spire_healer_incident_duration_seconds_count[$__range]))`, "MTTR")).
			NoValue("no incident closed")).
		WithPanel(ts(n, "Time to recover by symptom",
			"Median and 90th percentile incident duration over the last hour.",
			"s", 18,
			q("A", `histogram_quantile(0.5, sum by (le, symptom) (increase(spire_healer_incident_duration_seconds_bucket[1h])))`, "p50 {{symptom}}"),
			q("B", `histogram_quantile(0.9, sum by (le, symptom) (increase(spire_healer_incident_duration_seconds_bucket[1h])))`, "p90 {{symptom}}"))).
		WithPanel(ts(n, "Remediation success ratio",
			"Share of verified actions per actuator over the last hour (recording rule).",
			"percentunit", 12,
			q("A", `spire_healer:remediation_success_ratio:1h`, "{{actuator}}")).
			Min(0).Max(1)).
		WithPanel(ts(n, "Action duration",
			"90th percentile actuator run time.",
			"s", 12,
			q("A", `histogram_quantile(0.9, sum by (le, actuator) (rate(spire_healer_action_duration_seconds_bucket[$__rate_interval])))`, "p90 {{actuator}}")))

	// === Holds ===
	b.WithRow(row(n, "Holds")).
		WithPanel(ts(n, "Holds by reason",
			"Decisions not to act (guards, budgets, cooldowns, futility), per reason.",
			"none", 12,
			q("A", `sum by (reason) (increase(spire_healer_holds_total[$__rate_interval]))`, "{{reason}}"))).
		WithPanel(ts(n, "Incidents held back",
			"Open incidents currently held back, per reason.",
			"none", 12,
			q("A", `sum by (reason) (spire_healer_incidents_held)`, "{{reason}}")))

	// === Operator controls ===
	b.WithRow(row(n, "Operator controls")).
		WithPanel(st(n, "Paused",
			"Whether an operator paused spire-healer: it observes and records, but no remediation starts (spire-healer status, resume).",
			"none", 6,
			qi("A", `max(spire_healer_paused)`, "paused")).
			Mappings(upDown("paused", "acting")).
			Thresholds(thresholds(1, 1))).
		WithPanel(st(n, "Dry run",
			"Whether dry run is on: decisions are recorded, nothing is executed.",
			"none", 6,
			qi("A", `max(spire_healer_dry_run)`, "dry run")).
			Mappings(upDown("dry run", "acting")).
			Thresholds(thresholds(1, 1))).
		WithPanel(st(n, "Approvals pending",
			"Steps waiting for an operator's approval (spire-healer approvals --pending).",
			"none", 6,
			qi("A", `sum(spire_healer_approvals_pending)`, "pending")).
			Thresholds(thresholds(1, 1))).
		WithPanel(st(n, "Demoted steps",
			"(symptom, actuator) steps skipped for verifying too rarely, until an operator resets them.",
			"none", 6,
			qi("A", `sum(spire_healer_demoted_steps) or vector(0)`, "demoted")).
			Thresholds(thresholds(1, 1)))

	// === Instances and leadership ===
	b.WithRow(row(n, "Instances and leadership")).
		WithPanel(ts(n, "Acting instances by role",
			"Instances acting per role: node instances one per node, the cluster role exactly one leader (0: SpireHealerNoLeader, 2: SpireHealerTwoLeaders).",
			"none", 12,
			q("A", `sum by (role) (spire_healer_leader)`, "{{role}}"))).
		WithPanel(ts(n, "Cluster leader epoch",
			"The fencing epoch of the cluster role's leader: one step up per handover; writes of a former leader are refused.",
			"none", 12,
			q("A", `max(spire_healer_leader_epoch)`, "epoch")))

	// === Handshakes ===
	b.WithRow(row(n, "Handshakes")).
		WithPanel(ts(n, "Handshake failures by reason",
			"mTLS handshake failures per source (probe, report, envoy) and reason.",
			"none", 12,
			q("A", `sum by (source, reason) (increase(spire_healer_handshakes_total{reason!="ok"}[$__rate_interval]))`, "{{source}} {{reason}}"))).
		WithPanel(ts(n, "Probe duration by peer",
			"90th percentile active probe time (connect and handshake) per probed peer.",
			"s", 12,
			q("A", `histogram_quantile(0.9, sum by (le, target) (rate(spire_healer_handshake_probe_duration_seconds_bucket[$__rate_interval])))`, "{{target}}"))).
		WithPanel(ts(n, "Peer certificate time left",
			"Per probed peer: time until the leaf it last presented expires.",
			"s", 12,
			q("A", `spire_healer_handshake_peer_expiration_timestamp_seconds - time()`, "{{target}}"))).
		WithPanel(ts(n, "Handshake reports rejected",
			"Handshake outcomes or reports refused, per kind.",
			"none", 12,
			q("A", `sum by (kind) (increase(spire_healer_handshake_reports_rejected_total[$__rate_interval]))`, "{{kind}}")))

	// === Service levels (SPIRE) ===
	// The indicators of spire_healer_slo_events_total against the [slo]
	// objectives; the ratios are the recording rules the burn-rate alerts
	// use (deploy/prometheus/spire-healer.rules.yaml).
	b.WithRow(row(n, "Service levels (SPIRE)")).
		WithPanel(st(n, "Error budget remaining",
			"Per indicator, the share of its error budget (1 - objective) left over the dashboard's time range: 1 - (bad / all events) / budget. Below 0: overspent. No value for an objective of 1 (no budget: any bad event overspends it) or while no event was counted.",
			"percentunit", 24,
			qi("A", `1 - (sum by (slo) (increase(spire_healer_slo_events_total{result="bad"}[$__range])) / sum by (slo) (increase(spire_healer_slo_events_total[$__range]))) / on (slo) (max by (slo) (1 - spire_healer_slo_objective) > 0)`, "{{slo}}")).
			Thresholds(dashboard.NewThresholdsConfigBuilder().
				Mode(dashboard.ThresholdsModeAbsolute).
				Steps([]dashboard.Threshold{
					{Color: "red"},
					{Value: cog.ToPtr(0.0), Color: "orange"},
					{Value: cog.ToPtr(0.25), Color: "green"},
				}))).
		WithPanel(ts(n, "SLI vs objective",
			"Per indicator, the share of good events over the last hour (svid_issuance: served within [slo] issuance_latency of signing; renewal: rotated before the rotation point; handshake: completed; server_availability: admin-API poll answered), and its configured objective.",
			"percentunit", 12,
			q("A", `1 - spire_healer:slo_error_ratio:rate1h`, "{{slo}}"),
			q("B", `max by (slo) (spire_healer_slo_objective)`, "{{slo}} objective"))).
		WithPanel(ts(n, "Error budget burn rate",
			"Error ratio per error budget over 1h and 6h: 1 spends the budget exactly over 30 days; the alerts page at 14.4 (1h and 5m) or 6 (6h and 30m) and open a ticket at 3 (1d and 2h) or 1 (3d and 6h). No value for an objective of 1.",
			"none", 12,
			q("A", `spire_healer:slo_error_ratio:rate1h / (spire_healer:slo_error_budget:ratio > 0)`, "{{slo}} 1h"),
			q("B", `spire_healer:slo_error_ratio:rate6h / (spire_healer:slo_error_budget:ratio > 0)`, "{{slo}} 6h"))).
		WithPanel(ts(n, "SVID issuance latency",
			"99th and 50th percentile time from SPIRE signing a new SVID (notBefore + 10 s) to a Workload API stream serving it, and the [slo] issuance_latency. Each value may be up to 1 s high (notBefore has one-second resolution); clocks are assumed in sync.",
			"s", 12,
			q("A", `histogram_quantile(0.99, sum by (le) (rate(spire_healer_slo_svid_issuance_seconds_bucket[$__rate_interval])))`, "p99"),
			q("B", `histogram_quantile(0.5, sum by (le) (rate(spire_healer_slo_svid_issuance_seconds_bucket[$__rate_interval])))`, "p50"),
			q("C", `max(spire_healer_slo_issuance_latency_threshold_seconds)`, "objective"))).
		WithPanel(ts(n, "Service-level events",
			"Good and bad events per indicator.",
			"none", 12,
			q("A", `sum by (slo, result) (increase(spire_healer_slo_events_total[$__rate_interval]))`, "{{slo}} {{result}}")))

	// === Store and loop health ===
	b.WithRow(row(n, "Store and loop health")).
		WithPanel(st(n, "spire-healer up",
			"Prometheus reached spire-healer's /metrics at the last scrape.",
			"none", 4,
			qi("A", `up{`+jobSel+`}`, "{{instance}}")).
			Mappings(upDown("up", "down"))).
		WithPanel(st(n, "Version",
			"The running spire-healer version.",
			"none", 4,
			qi("A", `spire_healer_build_info`, "{{version}}")).
			TextMode(common.BigValueTextModeName)).
		WithPanel(st(n, "Store",
			"1 when the knowledge store accepted the last flush.",
			"none", 4,
			qi("A", `spire_healer_store_up`, "store")).
			Mappings(upDown("up", "down"))).
		WithPanel(st(n, "Since last tick",
			"Time since the supervisor last completed a tick.",
			"s", 4,
			qi("A", `time() - spire_healer_last_tick_timestamp_seconds`, "since last tick")).
			Thresholds(thresholds(10, 60))).
		WithPanel(st(n, "Blind sensors",
			"Sensors currently blind (failing past their grace).",
			"none", 4,
			qi("A", `sum(spire_healer_sensor_blind)`, "blind")).
			Thresholds(thresholds(1, 1))).
		WithPanel(st(n, "Events dropped",
			"Events dropped over the time range because the write buffer was full.",
			"none", 4,
			qi("A", `sum(increase(spire_healer_store_dropped_events_total[$__range]))`, "dropped")).
			Thresholds(thresholds(1, 1))).
		WithPanel(ts(n, "Tick duration",
			"99th percentile duration of one supervisor tick.",
			"s", 8,
			q("A", `histogram_quantile(0.99, sum by (le) (rate(spire_healer_tick_duration_seconds_bucket[$__rate_interval])))`, "p99"))).
		WithPanel(ts(n, "Sensor duration",
			"90th percentile duration of one observation, per sensor.",
			"s", 8,
			q("A", `histogram_quantile(0.9, sum by (le, sensor) (rate(spire_healer_sensor_duration_seconds_bucket[$__rate_interval])))`, "{{sensor}}"))).
		WithPanel(ts(n, "Sensor last success",
			"Time since each sensor last observed successfully.",
			"s", 8,
			q("A", `time() - spire_healer_sensor_last_success_timestamp_seconds`, "{{sensor}}"))).
		WithPanel(ts(n, "Store flush duration",
			"99th percentile duration of one write-buffer flush.",
			"s", 8,
			q("A", `histogram_quantile(0.99, sum by (le) (rate(spire_healer_store_flush_duration_seconds_bucket[$__rate_interval])))`, "p99"))).
		WithPanel(ts(n, "Store buffer",
			"Events waiting for the knowledge store, and events spooled to local disk.",
			"none", 8,
			q("A", `spire_healer_store_buffered_events`, "buffered"),
			q("B", `increase(spire_healer_store_spooled_events_total[$__rate_interval])`, "spooled"))).
		WithPanel(ts(n, "Spool size",
			"Bytes of events in the local spool, waiting for the database.",
			"bytes", 8,
			q("A", `spire_healer_store_spool_bytes`, "spool"))).
		WithPanel(ts(n, "Errors",
			"Errors per stage and kind.",
			"none", 24,
			q("A", `sum by (stage, kind) (increase(spire_healer_errors_total[$__rate_interval]))`, "{{stage}} {{kind}}")))
	return b
}
