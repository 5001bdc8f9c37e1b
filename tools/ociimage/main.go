// Command ociimage assembles an OCI image archive offline, without a
// container engine: one layer holding the given files, an entrypoint, and an
// index naming the image, loadable with `ctr images import` and `kind load
// image-archive` (and `docker load`, through the docker manifest.json beside
// the OCI index).
//
//	ociimage -o pause.tar -name localhost/ebpf-cni/pause:e2e -entrypoint /pause -file /pause=bin/pause
//
// -tree DIR adds a prepared root file system (directories, regular files
// and symlinks, e.g. busybox applets and shared libraries) below /.
//
// The format is small and fixed (image-spec v1.0): writing it here keeps the
// module free of a registry client's dependency tree.
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

type files []string

func (f *files) String() string     { return strings.Join(*f, ",") }
func (f *files) Set(v string) error { *f = append(*f, v); return nil }

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int               `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

func main() {
	out := flag.String("o", "image.tar", "archive to write")
	name := flag.String("name", "", "image name with tag, e.g. localhost/ebpf-cni:dev")
	entry := flag.String("entrypoint", "", "entrypoint, space separated")
	cmd := flag.String("cmd", "", "default arguments (the image's CMD), space separated")
	tree := flag.String("tree", "", "LOCAL_DIR whose contents become the image's / (symlinks kept)")
	var fs files
	flag.Var(&fs, "file", "IMAGE_PATH=LOCAL_FILE (repeatable); executable bits are kept")
	flag.Parse()
	if *name == "" || (len(fs) == 0 && *tree == "") {
		fmt.Fprintln(os.Stderr, "ociimage: -name and at least one -file or a -tree are required")
		os.Exit(2)
	}
	if err := build(*out, *name, strings.Fields(*entry), strings.Fields(*cmd), *tree, fs); err != nil {
		fmt.Fprintln(os.Stderr, "ociimage:", err)
		os.Exit(1)
	}
}

func digest(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// layer returns the gzipped layer and the digest of its uncompressed tar.
func layer(tree string, fs files) (gz []byte, diffID string, err error) {
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	dirs := map[string]bool{}
	epoch := time.Unix(0, 0)
	if tree != "" {
		if err := addTree(tw, tree, dirs); err != nil {
			return nil, "", err
		}
	}
	for _, f := range fs {
		dst, src, ok := strings.Cut(f, "=")
		if !ok || !strings.HasPrefix(dst, "/") {
			return nil, "", fmt.Errorf("-file %q: want /IMAGE_PATH=LOCAL_FILE", f)
		}
		data, err := os.ReadFile(src)
		if err != nil {
			return nil, "", err
		}
		st, err := os.Stat(src)
		if err != nil {
			return nil, "", err
		}
		rel := strings.TrimPrefix(dst, "/")
		for _, d := range parents(rel) {
			if dirs[d+"/"] {
				continue
			}
			dirs[d+"/"] = true
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: epoch}); err != nil {
				return nil, "", err
			}
		}
		hdr := &tar.Header{Typeflag: tar.TypeReg, Name: rel, Mode: int64(st.Mode().Perm()), Size: int64(len(data)), ModTime: epoch}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, "", err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, "", err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, "", err
	}
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	if _, err := zw.Write(raw.Bytes()); err != nil {
		return nil, "", err
	}
	if err := zw.Close(); err != nil {
		return nil, "", err
	}
	return z.Bytes(), digest(raw.Bytes()), nil
}

// addTree writes dir's directories, regular files and symlinks (targets
// kept as they are) in lexical order, with fixed times and root ownership.
func addTree(tw *tar.Writer, dir string, dirs map[string]bool) error {
	epoch := time.Unix(0, 0)
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		mode := int64(info.Mode().Perm())
		if info.Mode()&os.ModeSticky != 0 {
			mode |= 0o1000 // /tmp
		}
		hdr := &tar.Header{Name: filepath.ToSlash(rel), Mode: mode, ModTime: epoch}
		switch {
		case d.IsDir():
			hdr.Typeflag, hdr.Name = tar.TypeDir, hdr.Name+"/"
			dirs[hdr.Name] = true
			return tw.WriteHeader(hdr)
		case info.Mode()&os.ModeSymlink != 0:
			if hdr.Linkname, err = os.Readlink(p); err != nil {
				return err
			}
			hdr.Typeflag, hdr.Mode = tar.TypeSymlink, 0o777
			return tw.WriteHeader(hdr)
		case info.Mode().IsRegular():
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			hdr.Typeflag, hdr.Size = tar.TypeReg, int64(len(data))
			if err := tw.WriteHeader(hdr); err != nil {
				return err
			}
			_, err = tw.Write(data)
			return err
		}
		return fmt.Errorf("-tree: %s is neither a directory, a regular file nor a symlink", p)
	})
}

// parents lists the directories above a relative path, outermost first.
func parents(rel string) []string {
	var out []string
	for d := path.Dir(rel); d != "."; d = path.Dir(d) {
		out = append([]string{d}, out...)
	}
	return out
}

func build(out, name string, entry, cmd []string, tree string, fs files) error {
	layerGz, diffID, err := layer(tree, fs)
	if err != nil {
		return err
	}
	imageConfig := map[string]any{"Entrypoint": entry, "Env": []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}}
	if len(cmd) > 0 {
		imageConfig["Cmd"] = cmd
	}
	config, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"config":       imageConfig,
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{diffID}},
		"history":      []map[string]string{{"created_by": "ebpf-cni tools/ociimage"}},
	})
	if err != nil {
		return err
	}
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        descriptor{MediaType: "application/vnd.oci.image.config.v1+json", Digest: digest(config), Size: len(config)},
		"layers":        []descriptor{{MediaType: "application/vnd.oci.image.layer.v1.tar+gzip", Digest: digest(layerGz), Size: len(layerGz)}},
	})
	if err != nil {
		return err
	}
	tag := name[strings.LastIndex(name, ":")+1:]
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.index.v1+json",
		"manifests": []descriptor{{
			MediaType: "application/vnd.oci.image.manifest.v1+json", Digest: digest(manifest), Size: len(manifest),
			Annotations: map[string]string{"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag},
		}},
	})
	if err != nil {
		return err
	}
	blob := func(b []byte) string { return "blobs/sha256/" + strings.TrimPrefix(digest(b), "sha256:") }
	dockerManifest, err := json.Marshal([]map[string]any{{
		"Config": blob(config), "RepoTags": []string{name}, "Layers": []string{blob(layerGz)},
	}})
	if err != nil {
		return err
	}

	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	epoch := time.Unix(0, 0)
	entries := []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", index},
		{"manifest.json", dockerManifest},
		{blob(config), config},
		{blob(manifest), manifest},
		{blob(layerGz), layerGz},
	}
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: epoch}); err != nil {
			return err
		}
	}
	for _, e := range entries {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: e.name, Mode: 0o644, Size: int64(len(e.data)), ModTime: epoch}); err != nil {
			return err
		}
		if _, err := tw.Write(e.data); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return f.Close()
}
