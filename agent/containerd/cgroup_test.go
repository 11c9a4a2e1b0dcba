package containerd

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseProcCgroup(t *testing.T) {
	const id = "2177caff2766e422a1febe538eaaaf504a2bc65954c8f870a65d7f63f3a85f01"
	const uid = "4a0ea506-3e6f-3e90-58fa-005f4c480c48"
	tests := []struct {
		name    string
		in      string
		want    CgroupRef
		wantErr error
	}{
		{
			name: "cgroupfs v1 hybrid",
			in: "12:pids:/kubepods/besteffort/pod" + uid + "/" + id + "\n" +
				"0::/kubepods/besteffort/pod" + uid + "/" + id + "\n",
			want: CgroupRef{PodUID: uid, ContainerID: id},
		},
		{
			name: "guaranteed pod (no qos folder)",
			in:   "0::/kubepods/pod" + uid + "/" + id + "\n",
			want: CgroupRef{PodUID: uid, ContainerID: id},
		},
		{
			name: "systemd driver",
			in: "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" +
				strings.ReplaceAll(uid, "-", "_") + ".slice/cri-containerd-" + id + ".scope\n",
			want: CgroupRef{PodUID: uid, ContainerID: id},
		},
		{
			// Read from inside a container with its own cgroup namespace
			// (the agent's DaemonSet pod on cgroup v2): relative to our root.
			name: "relative to a cgroup namespace",
			in:   "0::/../../../besteffort/pod" + uid + "/" + id + "\n",
			want: CgroupRef{PodUID: uid, ContainerID: id},
		},
		{
			name:    "host process",
			in:      "12:pids:/user.slice\n0::/user.slice/user-0.slice/session-1.scope\n",
			wantErr: ErrNotInPod,
		},
		{
			name:    "pod folder itself (not a container)",
			in:      "0::/kubepods/besteffort/pod" + uid + "\n",
			wantErr: ErrNotInPod,
		},
		{
			name:    "short id",
			in:      "0::/kubepods/besteffort/pod" + uid + "/abc\n",
			wantErr: ErrNotInPod,
		},
		{name: "garbage", in: "nonsense\n", wantErr: ErrNotInPod},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseProcCgroup(strings.NewReader(tt.in))
			if tt.wantErr != nil {
				require.ErrorIs(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}
