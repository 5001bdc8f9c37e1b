package main

import (
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/ebpf-cni/ebpf-cni/internal/config"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
)

// cmdStatus answers whether an ADD can be served now, without taking a
// write lock or changing anything on the node: bpffs at the pin root (or a
// pin root under /sys/fs/bpf, where ADD mounts it), pins of a layout this
// build can use (absent pins are fine: the first ADD creates them), and
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
	if err := conf.Addresses.Status(); err != nil {
		var ce *types.Error
		if errors.As(err, &ce) && (ce.Code == errNotReady || ce.Code == errImpaired) {
			return nil, ce // a delegated plugin's own 50/51
		}
		return nil, notReady("ipam: %v", err)
	}
	return nil, nil
}
