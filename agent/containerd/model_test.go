package containerd

import (
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseSidecars(t *testing.T) {
	tests := []struct {
		in      string
		want    []string
		wantErr string
	}{
		{in: "", want: nil},
		{in: "  ", want: nil},
		{in: "mosn", want: []string{"mosn"}},
		{in: "envoy, log-agent", want: []string{"envoy", "log-agent"}},
		{in: "envoy,,x", wantErr: `annotation meshagent.io/sidecars="envoy,,x": empty container name`},
		{in: "Envoy", wantErr: `"Envoy" is not a container name`},
		{in: "-x", wantErr: `"-x" is not a container name`},
		{in: "a,a", wantErr: `"a" listed twice`},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseSidecars(tt.in)
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestIdentify(t *testing.T) {
	specJSON := func(ann string) []byte { return []byte(`{"ociVersion":"1.0.2","annotations":{` + ann + `}}`) }
	tests := []struct {
		name    string
		rec     record
		want    Container
		wantOK  bool
		wantErr string
	}{
		{
			name: "sandbox from labels",
			rec: record{ID: "sb1", Labels: map[string]string{
				LabelKind: "sandbox", LabelPodName: "web", LabelPodNamespace: "prod", LabelPodUID: "u1",
			}},
			want:   Container{ID: "sb1", Kind: KindSandbox, Role: RoleSandbox, SandboxID: "sb1", Pod: PodRef{"web", "prod", "u1"}},
			wantOK: true,
		},
		{
			name: "container: labels plus sandbox id from the spec",
			rec: record{ID: "c1", Labels: map[string]string{
				LabelKind: "container", LabelPodName: "web", LabelPodNamespace: "prod", LabelPodUID: "u1",
				LabelContainerName: "mosn", LabelStopSignal: "SIGQUIT",
			}, Spec: specJSON(`"io.kubernetes.cri.sandbox-id":"sb1"`)},
			want:   Container{ID: "c1", Name: "mosn", Kind: KindContainer, SandboxID: "sb1", Pod: PodRef{"web", "prod", "u1"}, StopSignal: "SIGQUIT"},
			wantOK: true,
		},
		{
			name: "container from spec annotations only",
			rec: record{ID: "c2", Spec: specJSON(`"io.kubernetes.cri.container-type":"container",
				"io.kubernetes.cri.sandbox-id":"sb1","io.kubernetes.cri.sandbox-name":"web",
				"io.kubernetes.cri.sandbox-namespace":"prod","io.kubernetes.cri.sandbox-uid":"u1",
				"io.kubernetes.cri.container-name":"app"`)},
			want:   Container{ID: "c2", Name: "app", Kind: KindContainer, SandboxID: "sb1", Pod: PodRef{"web", "prod", "u1"}},
			wantOK: true,
		},
		{
			name:   "not a CRI container",
			rec:    record{ID: "x", Labels: map[string]string{"foo": "bar"}},
			wantOK: false,
		},
		{
			name:   "container without sandbox id",
			rec:    record{ID: "c3", Labels: map[string]string{LabelKind: "container", LabelContainerName: "app"}},
			wantOK: false,
		},
		{
			name:    "broken spec",
			rec:     record{ID: "c4", Spec: []byte("{")},
			wantErr: "container c4: decode OCI spec",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok, err := identify(tt.rec)
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.wantOK, ok)
			if tt.wantOK {
				assert.Equal(t, tt.want, got)
			}
		})
	}
}

func TestBuildPods(t *testing.T) {
	t0 := time.Unix(100, 0)
	ref := PodRef{"web", "prod", "u1"}
	cs := []Container{
		{ID: "app1", Name: "app", Kind: KindContainer, SandboxID: "sb1", Pod: ref, CreatedAt: t0.Add(2 * time.Second)},
		{ID: "sb1", Kind: KindSandbox, Role: RoleSandbox, SandboxID: "sb1", Pod: ref, CreatedAt: t0},
		{ID: "mosn1", Name: "mosn", Kind: KindContainer, SandboxID: "sb1", Pod: ref, CreatedAt: t0.Add(time.Second)},
		{ID: "bad-app", Name: "app", Kind: KindContainer, SandboxID: "sb2", Pod: PodRef{"api", "prod", "u2"}, CreatedAt: t0},
		{ID: "orphan", Name: "x", Kind: KindContainer, SandboxID: "sb3", Pod: PodRef{"a", "default", "u3"}, CreatedAt: t0},
	}
	sandboxes := map[string]sandboxInfo{
		"sb1": {Annotations: map[string]string{AnnotationSidecars: "mosn"}},
		"sb2": {Annotations: map[string]string{AnnotationSidecars: "BAD"}},
	}
	pods, errs := buildPods(cs, sandboxes, map[string]uint32{"mosn1": 3})

	require.Len(t, pods, 3)
	require.Len(t, errs, 1)
	assert.Contains(t, errs[0].Error(), "pod prod/api (sandbox sb2)")

	// Sorted by namespace then name: default/a, prod/api, prod/web.
	assert.Equal(t, "sb3", pods[0].SandboxID)
	assert.Nil(t, pods[0].Annotations, "CRI does not know sb3")
	assert.Nil(t, pods[0].Sandbox)
	assert.Equal(t, RoleApp, pods[0].Containers[0].Role)

	assert.Equal(t, RoleApp, pods[1].Containers[0].Role, "a bad annotation makes everything an app")

	web := pods[2]
	require.NotNil(t, web.Sandbox)
	assert.Equal(t, "sb1", web.Sandbox.ID)
	require.Len(t, web.Containers, 2)
	assert.Equal(t, "mosn", web.Containers[0].Name, "oldest first")
	assert.Equal(t, RoleSidecar, web.Containers[0].Role)
	assert.Equal(t, uint32(3), web.Containers[0].Attempt)
	assert.Equal(t, "app", web.Containers[1].Name)
	assert.Equal(t, RoleApp, web.Containers[1].Role)
}

func TestParseSignal(t *testing.T) {
	tests := []struct {
		in   string
		want syscall.Signal
		err  bool
	}{
		{"SIGTERM", syscall.SIGTERM, false},
		{"quit", syscall.SIGQUIT, false},
		{"9", syscall.SIGKILL, false},
		{"SIGNOPE", 0, true},
		{"", 0, true},
	}
	for _, tt := range tests {
		got, err := parseSignal(tt.in)
		if tt.err {
			assert.Error(t, err, tt.in)
			continue
		}
		assert.NoError(t, err, tt.in)
		assert.Equal(t, tt.want, got, tt.in)
	}
}
