package metrics

import (
	"encoding/json"
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
)

const dashboardPath = "../deploy/grafana/meshagent-dashboard.json"

// Label names Prometheus adds at scrape time, and the histogram bucket label.
var targetLabels = map[string]bool{"job": true, "instance": true}

var (
	// A metric name in PromQL, with the label matchers that follow it.
	metricRef = regexp.MustCompile(`\b((?:meshagent|process|go)_[a-zA-Z0-9_]*)\s*(\{[^}]*\})?`)
	// A label name in a matcher list: name followed by =, !=, =~ or !~.
	matcherLabel = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)`)
	// Grouping clauses: by (...), without (...), on (...), ignoring (...).
	grouping = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)`)
)

type family struct {
	typ    dto.MetricType
	labels map[string]bool
}

// registryFamilies gathers every family with every series populated, so
// that vectors without observations are listed too.
func registryFamilies(t *testing.T) map[string]family {
	t.Helper()
	src := newFakeStats()
	m := newMetrics(t, Options{Stats: src})
	exerciseAll(m, src, "p")
	out := map[string]family{}
	for name, mf := range gather(t, m) {
		f := family{typ: mf.GetType(), labels: map[string]bool{}}
		for _, mt := range mf.GetMetric() {
			for _, lp := range mt.GetLabel() {
				f.labels[lp.GetName()] = true
			}
		}
		out[name] = f
	}
	return out
}

// resolve maps a name used in PromQL to its family: histograms are queried
// through their _bucket, _sum and _count series.
func resolve(fams map[string]family, name string) (string, family, bool) {
	if f, ok := fams[name]; ok {
		return name, f, true
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		base, ok := strings.CutSuffix(name, suffix)
		if !ok {
			continue
		}
		if f, ok := fams[base]; ok && (f.typ == dto.MetricType_HISTOGRAM || f.typ == dto.MetricType_SUMMARY) {
			if suffix == "_bucket" && f.typ != dto.MetricType_HISTOGRAM {
				return "", family{}, false
			}
			return base, f, true
		}
	}
	return "", family{}, false
}

// TestDashboardMatchesRegistry keeps deploy/grafana/meshagent-dashboard.json
// and this package in step: every metric the dashboard queries exists here
// with the labels it filters and groups by, every meshagent_ family defined
// here has a panel, and the data source is the dashboard's variable.
func TestDashboardMatchesRegistry(t *testing.T) {
	raw, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatalf("read dashboard: %v", err)
	}
	var dash map[string]any
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("%s is not valid JSON: %v", dashboardPath, err)
	}
	fams := registryFamilies(t)

	exprs := dashboardExprs(t, dash)
	if len(exprs) == 0 {
		t.Fatal("dashboard has no PromQL expressions")
	}
	used := map[string]bool{}
	for where, expr := range exprs {
		refLabels := map[string]bool{"le": true}
		for _, m := range metricRef.FindAllStringSubmatch(expr, -1) {
			name, matchers := m[1], m[2]
			base, f, ok := resolve(fams, name)
			if !ok {
				t.Errorf("%s: metric %s is not defined by package metrics", where, name)
				continue
			}
			used[base] = true
			for l := range f.labels {
				refLabels[l] = true
			}
			for _, lm := range matcherLabel.FindAllStringSubmatch(matchers, -1) {
				l := lm[1]
				if !f.labels[l] && !targetLabels[l] && !(l == "le" && strings.HasSuffix(name, "_bucket")) {
					t.Errorf("%s: %s has no label %q (has %v)", where, base, l, keys(f.labels))
				}
			}
		}
		for _, g := range grouping.FindAllStringSubmatch(expr, -1) {
			for _, l := range strings.Split(g[1], ",") {
				l = strings.TrimSpace(l)
				if l != "" && !refLabels[l] && !targetLabels[l] {
					t.Errorf("%s: groups by %q, which none of its metrics has", where, l)
				}
			}
		}
	}
	for name := range fams {
		if strings.HasPrefix(name, "meshagent_") && !used[name] {
			t.Errorf("metric %s has no panel in %s", name, dashboardPath)
		}
	}
}

// dashboardExprs returns every PromQL expression in the dashboard (panel
// targets and variable queries), keyed by where it is, and checks each panel
// and target uses the datasource variable.
func dashboardExprs(t *testing.T, dash map[string]any) map[string]string {
	t.Helper()
	templ, _ := dash["templating"].(map[string]any)
	vars, _ := templ["list"].([]any)
	hasDS := false
	out := map[string]string{}
	for _, v := range vars {
		v, _ := v.(map[string]any)
		name, _ := v["name"].(string)
		switch v["type"] {
		case "datasource":
			if name == "datasource" && v["query"] == "prometheus" {
				hasDS = true
			}
		case "query":
			checkDS(t, "variable "+name, v["datasource"])
			q, _ := v["definition"].(string)
			out["variable "+name] = q
		}
	}
	if !hasDS {
		t.Error(`dashboard has no Prometheus datasource variable named "datasource"`)
	}
	panels, _ := dash["panels"].([]any)
	for _, p := range panels {
		p, _ := p.(map[string]any)
		title, _ := p["title"].(string)
		if p["type"] == "row" {
			continue
		}
		checkDS(t, "panel "+title, p["datasource"])
		targets, _ := p["targets"].([]any)
		if len(targets) == 0 {
			t.Errorf("panel %q has no targets", title)
		}
		for _, tg := range targets {
			tg, _ := tg.(map[string]any)
			ref, _ := tg["refId"].(string)
			where := "panel " + title + " " + ref
			checkDS(t, where, tg["datasource"])
			expr, _ := tg["expr"].(string)
			if expr == "" {
				t.Errorf("%s: empty expr", where)
			}
			out[where] = expr
		}
	}
	return out
}

func checkDS(t *testing.T, where string, ds any) {
	t.Helper()
	m, _ := ds.(map[string]any)
	if m["uid"] != "${datasource}" {
		t.Errorf("%s: datasource %v, want the ${datasource} variable", where, ds)
	}
}

func keys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
