// Package testimages holds the tiny static programs that the containerd tests
// run as container images, and (in build/) the program that packs them into
// OCI image archives.
//
// No image registry is reachable from CI, so every image a test needs is built
// here from source: pause (the pod sandbox), sidecar (a proxy stand-in that
// becomes ready after a delay and can be told to hang) and app (records when it
// started, then waits or exits). scripts/ci-containerd.sh builds the archives
// and imports them into containerd's k8s.io namespace under the names below.
package testimages

// Image references as imported into containerd. The tag is fixed: the
// archives are reproducible, so re-importing them is a no-op.
const (
	Pause   = "meshagent.test/pause:1"
	Sidecar = "meshagent.test/sidecar:1"
	App     = "meshagent.test/app:1"
)
