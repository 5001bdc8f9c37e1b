package main

import (
	"errors"
	"fmt"
	"strings"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/ebpf-cni/ebpf-cni/internal/config"
	"github.com/ebpf-cni/ebpf-cni/internal/endpoint"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
)

// cmdStatus answers whether an ADD can be served now, without taking a
// write lock or changing anything on the node: bpffs at the pin root (or a
// pin root under /sys/fs/bpf, where ADD mounts it), pins of a layout this
// build can use (absent pins are fine: the first ADD creates them), every
// live pod's datapath in place (else 51: existing pods are impaired), and
// addresses to hand out. Anything else is 50.
func cmdStatus(_ *skel.CmdArgs, conf *config.NetConf) (types.Result, error) {
	notReady := func(format string, a ...any) error {
		return types.NewError(errNotReady, fmt.Sprintf(format, a...), "")
	}
	if err := loader.CheckBPFFS(conf.PinRoot); err != nil {
		return nil, notReady("bpffs: %v", err)
	}
	if err := loader.CheckPins(conf.PinRoot); err != nil {
		return nil, notReady("pins: %v", err)
	}
	// Pods whose datapath is gone (pins removed, bpffs remounted) lost
	// their anti-spoofing and fast path: 51 until it is repaired (by
	// ebpf-cni-agent within seconds, or `ebpf-cni repair`).
	if h, err := endpoint.Check(conf.StateDir, conf.PinRoot); len(h.Missing) > 0 {
		return nil, types.NewError(errImpaired, fmt.Sprintf("%d of %d pods lost their datapath (run ebpf-cni repair, or start ebpf-cni-agent): %s",
			len(h.Missing), h.Live, strings.Join(h.Missing[:min(3, len(h.Missing))], "; ")), "")
	} else if err != nil {
		return nil, notReady("endpoint records: %v", err)
	}
	if err := conf.Addresses.Status(); err != nil {
		var ce *types.Error
		if errors.As(err, &ce) && (ce.Code == errNotReady || ce.Code == errImpaired) {
			return nil, ce // a delegated plugin's own 50/51
		}
		return nil, notReady("ipam: %v", err)
	}
	return nil, nil
}
