package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/ebpf-cni/ebpf-cni/internal/endpoint"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	"github.com/ebpf-cni/ebpf-cni/internal/nat"
	"github.com/ebpf-cni/ebpf-cni/internal/uplink"
)

// uninstall removes what ebpf-cni put on the node outside its pods: the
// programs on the uplinks and the VXLAN device (programs of others stay).
// Once no pod is attached any more, also every pin under the pin root and
// the masquerade table; pods still attached keep their datapath, and their
// DEL removes the rest.
func uninstall(argv []string, stdout, stderr io.Writer) error {
	fs, pinRoot, stateDir := nodeFlags("uninstall", stderr)
	if err := fs.Parse(argv); err != nil {
		return err
	}
	var errs []error
	// The node's hooks first: uplinks, and the socket programs of
	// Services (ebpf-cni-agent re-attaches them while it runs).
	errs = append(errs, loader.DetachNodes(*pinRoot), loader.DetachCgroup(*pinRoot), uplink.Forget(*stateDir))
	pods := 0
	for _, n := range endpoint.Networks(*stateDir) {
		recs, _, err := endpoint.NewStore(*stateDir, n).List()
		errs = append(errs, err)
		pods += len(recs)
	}
	if m, err := maps.Open(*pinRoot); err == nil {
		eps, err := m.Endpoints()
		errs = append(errs, err)
		pods = max(pods, len(eps))
		m.Close()
	} else if !errors.Is(err, loader.ErrNotLoaded) {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if pods > 0 {
		fmt.Fprintf(stdout, "detached the node devices and the Service hooks; %d pod address(es) still use the datapath under %s: their DEL removes the rest\n", pods, *pinRoot)
		return nil
	}
	if err := os.RemoveAll(*pinRoot); err != nil {
		return fmt.Errorf("remove pins: %w", err)
	}
	for _, n := range endpoint.Networks(*stateDir) {
		errs = append(errs, nat.Remove(n))
	}
	fmt.Fprintf(stdout, "detached the node devices and the Service hooks, removed %s and the masquerade rules: nothing of ebpf-cni is left in the kernel\n", *pinRoot)
	return errors.Join(errs...)
}
