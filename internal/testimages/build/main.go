// Command build packs the test programs of internal/testimages into OCI image
// archives that `ctr images import` (or the containerd client) accepts.
//
//	go run ./internal/testimages/build -out DIR
//
// For each image it compiles the program as a static binary and writes
// DIR/<name>.tar: an OCI layout (oci-layout, index.json, blobs/sha256/...)
// holding one manifest, its config and a single gzipped layer with the binary
// at /<name>. Timestamps are fixed, so the same source gives the same digests
// and a second import changes nothing.
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	_ "crypto/sha256" // registers the hash go-digest uses
	"encoding/json"
	"flag"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/meshagent/meshagent/internal/testimages"
)

// image is one archive to build: program is the package under
// internal/testimages, ref the name containerd will know it by.
type image struct {
	program string
	ref     string
}

var images = []image{
	{program: "pause", ref: testimages.Pause},
	{program: "sidecar", ref: testimages.Sidecar},
	{program: "app", ref: testimages.App},
}

// epoch is the modification time of every file in every layer.
var epoch = time.Unix(0, 0).UTC()

func main() {
	out := flag.String("out", "", "directory to write <image>.tar archives into (required)")
	flag.Parse()
	if *out == "" {
		fmt.Fprintln(os.Stderr, "build: -out is required")
		os.Exit(2)
	}
	if err := run(*out); err != nil {
		fmt.Fprintln(os.Stderr, "build:", err)
		os.Exit(1)
	}
}

func run(out string) error {
	if err := os.MkdirAll(out, 0o755); err != nil {
		return fmt.Errorf("create output dir: %w", err)
	}
	work, err := os.MkdirTemp("", "meshagent-testimages-")
	if err != nil {
		return fmt.Errorf("create work dir: %w", err)
	}
	defer os.RemoveAll(work)

	for _, img := range images {
		bin := filepath.Join(work, img.program)
		if err := compile(img.program, bin); err != nil {
			return err
		}
		archive, err := pack(img, bin)
		if err != nil {
			return fmt.Errorf("image %s: %w", img.ref, err)
		}
		dst := filepath.Join(out, img.program+".tar")
		if err := writeFileAtomic(dst, archive); err != nil {
			return fmt.Errorf("image %s: %w", img.ref, err)
		}
		fmt.Printf("%s %s\n", dst, img.ref)
	}
	return nil
}

// compile builds one test program as a static linux binary.
func compile(program, dst string) error {
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", dst,
		"github.com/meshagent/meshagent/internal/testimages/"+program)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("compile %s: %w", program, err)
	}
	return nil
}

// pack returns the OCI archive (a tar of an OCI layout) for img.
func pack(img image, bin string) ([]byte, error) {
	exe, err := os.ReadFile(bin)
	if err != nil {
		return nil, fmt.Errorf("read binary: %w", err)
	}
	layerTar, err := tarOf(map[string][]byte{img.program: exe})
	if err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	layer, err := gzipped(layerTar)
	if err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}

	config, err := json.Marshal(ocispec.Image{
		Created:  &epoch,
		Platform: ocispec.Platform{Architecture: runtime.GOARCH, OS: "linux"},
		Config: ocispec.ImageConfig{
			Entrypoint: []string{"/" + img.program},
			Env:        []string{"PATH=/"},
		},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{digest.FromBytes(layerTar)}},
	})
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	manifest, err := json.Marshal(ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    descriptor(ocispec.MediaTypeImageConfig, config),
		Layers:    []ocispec.Descriptor{descriptor(ocispec.MediaTypeImageLayerGzip, layer)},
	})
	if err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	md := descriptor(ocispec.MediaTypeImageManifest, manifest)
	md.Platform = &ocispec.Platform{Architecture: runtime.GOARCH, OS: "linux"}
	md.Annotations = map[string]string{
		// containerd names the imported image after this annotation.
		"io.containerd.image.name": img.ref,
		ocispec.AnnotationRefName:  img.ref,
	}
	index, err := json.Marshal(ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{md},
	})
	if err != nil {
		return nil, fmt.Errorf("index: %w", err)
	}
	layout, err := json.Marshal(ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion})
	if err != nil {
		return nil, fmt.Errorf("layout: %w", err)
	}

	files := map[string][]byte{
		ocispec.ImageLayoutFile: layout,
		"index.json":            index,
	}
	for _, blob := range [][]byte{layer, config, manifest} {
		files["blobs/sha256/"+digest.FromBytes(blob).Encoded()] = blob
	}
	return tarOf(files)
}

func descriptor(mediaType string, blob []byte) ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(blob), Size: int64(len(blob))}
}

// tarOf writes files (path → content) into a tar with sorted names, fixed
// times and root ownership, creating the parent directories it needs.
// Executables are recognised by their ELF header and get mode 0755.
func tarOf(files map[string][]byte) ([]byte, error) {
	names := slices.Collect(maps.Keys(files))
	slices.Sort(names)

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	for _, name := range names {
		if err := writeDirs(tw, dirs, filepath.Dir(name)); err != nil {
			return nil, err
		}
		data := files[name]
		mode := int64(0o644)
		if bytes.HasPrefix(data, []byte("\x7fELF")) {
			mode = 0o755
		}
		hdr := &tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, fmt.Errorf("tar header %s: %w", name, err)
		}
		if _, err := tw.Write(data); err != nil {
			return nil, fmt.Errorf("tar write %s: %w", name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("tar close: %w", err)
	}
	return buf.Bytes(), nil
}

func writeDirs(tw *tar.Writer, done map[string]bool, dir string) error {
	if dir == "." || done[dir] {
		return nil
	}
	if err := writeDirs(tw, done, filepath.Dir(dir)); err != nil {
		return err
	}
	done[dir] = true
	hdr := &tar.Header{Typeflag: tar.TypeDir, Name: dir + "/", Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}
	if err := tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("tar header %s: %w", dir, err)
	}
	return nil
}

func gzipped(data []byte) ([]byte, error) {
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	if err != nil {
		return nil, err
	}
	// The zero header (no name, no mtime) keeps the digest reproducible.
	if _, err := zw.Write(data); err != nil {
		return nil, fmt.Errorf("gzip: %w", err)
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("gzip: %w", err)
	}
	return buf.Bytes(), nil
}

// writeFileAtomic replaces path, so a concurrent import never reads half an
// archive and concurrent builders do not trip over each other's temp files.
func writeFileAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("create temp for %s: %w", path, err)
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp, 0o644)
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
