package cgroup

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/meshagent/meshagent/internal/execshim"
)

func TestKubeLayout(t *testing.T) {
	const uid = "1f2e3d4c-aaaa-bbbb-cccc-0123456789ab"
	const id = "0a1b2c3d4e5f"
	for _, tc := range []struct {
		name     string
		l        KubeLayout
		qos      QoS
		pod, ctr Group
	}{
		{"cgroupfs burstable", KubeLayout{}, QoSBurstable,
			"kubepods/burstable/pod" + uid, "kubepods/burstable/pod" + uid + "/" + id},
		{"cgroupfs besteffort", KubeLayout{}, QoSBestEffort,
			"kubepods/besteffort/pod" + uid, "kubepods/besteffort/pod" + uid + "/" + id},
		{"cgroupfs guaranteed has no qos level", KubeLayout{}, QoSGuaranteed,
			"kubepods/pod" + uid, "kubepods/pod" + uid + "/" + id},
		{"systemd burstable", KubeLayout{Driver: DriverSystemd}, QoSBurstable,
			"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f2e3d4c_aaaa_bbbb_cccc_0123456789ab.slice",
			"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f2e3d4c_aaaa_bbbb_cccc_0123456789ab.slice/cri-containerd-" + id + ".scope"},
		{"systemd guaranteed", KubeLayout{Driver: DriverSystemd}, QoSGuaranteed,
			"kubepods.slice/kubepods-pod1f2e3d4c_aaaa_bbbb_cccc_0123456789ab.slice",
			"kubepods.slice/kubepods-pod1f2e3d4c_aaaa_bbbb_cccc_0123456789ab.slice/cri-containerd-" + id + ".scope"},
		{"cgroupfs with a cgroup root", KubeLayout{Parent: "/node1/kubepods"}, QoSBurstable,
			"node1/kubepods/burstable/pod" + uid, "node1/kubepods/burstable/pod" + uid + "/" + id},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pg, err := tc.l.PodGroup(tc.qos, uid)
			if err != nil || pg != tc.pod {
				t.Fatalf("PodGroup = %q, %v; want %q", pg, err, tc.pod)
			}
			cg, err := tc.l.ContainerGroup(tc.qos, uid, id)
			if err != nil || cg != tc.ctr {
				t.Fatalf("ContainerGroup = %q, %v; want %q", cg, err, tc.ctr)
			}
			// And back: the path of a process of the container names the pod.
			ref, err := ParseKubeGroup("/" + string(cg))
			if err != nil {
				t.Fatal(err)
			}
			if ref.PodUID != uid || ref.ContainerID != id || ref.QoS != tc.qos || ref.Driver != tc.l.Driver ||
				ref.PodGroup != tc.pod || ref.Group != tc.ctr {
				t.Fatalf("ParseKubeGroup = %+v", ref)
			}
			ref, err = ParseKubeGroup(string(pg))
			if err != nil || ref.ContainerID != "" || ref.PodUID != uid {
				t.Fatalf("ParseKubeGroup(pod) = %+v, %v", ref, err)
			}
		})
	}
	for _, bad := range []struct {
		qos      QoS
		uid, ctr string
	}{{"gold", uid, id}, {QoSBurstable, "", id}, {QoSBurstable, "a/b", id}, {QoSBurstable, uid, "../x"}} {
		if _, err := (KubeLayout{}).ContainerGroup(bad.qos, bad.uid, bad.ctr); err == nil {
			t.Errorf("ContainerGroup(%q, %q, %q) accepted", bad.qos, bad.uid, bad.ctr)
		}
	}
}

func TestParseKubeGroupRejects(t *testing.T) {
	for _, p := range []string{"/", "/user.slice/user-0.slice", "/kubepods", "/kubepods/burstable", "/kubepods/burstable/xyz",
		"/kubepods.slice/kubepods-burstable.slice", "/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-podx.slice",
		"/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc"} {
		if ref, err := ParseKubeGroup(p); !errors.Is(err, ErrNotKube) {
			t.Errorf("ParseKubeGroup(%q) = %+v, %v; want ErrNotKube", p, ref, err)
		}
	}
}

func TestKubeRefOfPID(t *testing.T) {
	proc := t.TempDir()
	files := map[int]string{
		// v1 hybrid node with the cgroupfs driver
		100: "12:memory:/kubepods/burstable/podabc-1/c0ffee\n11:cpu,cpuacct:/kubepods/burstable/podabc-1/c0ffee\n0::/\n",
		// v2 node with the systemd driver
		200: "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podabc_2.slice/cri-containerd-beef.scope\n",
		// not in a pod
		300: "4:memory:/user.slice\n0::/user.slice\n",
	}
	for pid, content := range files {
		d := filepath.Join(proc, strconv.Itoa(pid))
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "cgroup"), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ref, err := KubeRefOfPID(proc, 100)
	if err != nil || ref.PodUID != "abc-1" || ref.ContainerID != "c0ffee" || ref.QoS != QoSBurstable {
		t.Fatalf("pid 100: %+v, %v", ref, err)
	}
	ref, err = KubeRefOfPID(proc, 200)
	if err != nil || ref.PodUID != "abc-2" || ref.ContainerID != "beef" || ref.QoS != QoSBestEffort || ref.Driver != DriverSystemd {
		t.Fatalf("pid 200: %+v, %v", ref, err)
	}
	if _, err := KubeRefOfPID(proc, 300); !errors.Is(err, ErrNotKube) {
		t.Fatalf("pid 300: %v, want ErrNotKube", err)
	}
	if _, err := KubeRefOfPID(proc, 400); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pid 400: %v, want not exist", err)
	}
	// This test process is not in a pod.
	if _, err := KubeRefOfPID("", os.Getpid()); !errors.Is(err, ErrNotKube) {
		t.Fatalf("own pid: %v, want ErrNotKube", err)
	}
}

// A process placed in a kubelet-shaped group on the real cgroup fs is
// traced back to its pod and container from /proc/PID/cgroup.
func TestKubeRefOfRealProcess(t *testing.T) {
	checkLeaks(t)
	m := needRealV1(t)
	top := podName(t) + "-kube"
	t.Cleanup(func() {
		if err := m.Remove(Group(top)); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	for _, l := range []KubeLayout{
		{Parent: top + "/kubepods"},
		{Driver: DriverSystemd, Parent: top + "/kubepods.slice"},
	} {
		t.Run(l.Driver.String(), func(t *testing.T) {
			const uid = "6b1c2d3e-0000-4000-8000-00000000abcd"
			const id = "d00dfeed"
			g, err := l.ContainerGroup(QoSBurstable, uid, id)
			if err != nil {
				t.Fatal(err)
			}
			if err := m.ensure(g); err != nil {
				t.Fatal(err)
			}
			files, _ := m.ProcsFiles(g)
			c := startChild(t, execshim.Spec{CgroupProcs: files}, "hold:0")
			c.waitLine(t, "ready", 20*time.Second)
			ref, err := KubeRefOfPID("", c.cmd.Process.Pid)
			if err != nil {
				t.Fatal(err)
			}
			if ref.PodUID != uid || ref.ContainerID != id || ref.QoS != QoSBurstable || ref.Driver != l.Driver || ref.Group != g {
				t.Fatalf("KubeRefOfPID = %+v, want pod %s container %s in %s", ref, uid, id, g)
			}
			c.kill()
		})
	}
}
