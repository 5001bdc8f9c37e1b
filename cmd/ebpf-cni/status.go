package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/ebpf-cni/ebpf-cni/internal/loader"
)

// cmdStatus answers whether an ADD can be served now: bpffs at the pin root
// (mounted at /sys/fs/bpf here if missing, as ADD would), pins of a layout
// this build can use (absent pins are fine: the first ADD creates them),
// and free addresses. Anything else is 50.
func cmdStatus(args *skel.CmdArgs) (types.Result, error) {
	conf, err := parseConfig(args.StdinData)
	if err != nil {
		return nil, err
	}
	notReady := func(format string, a ...any) error {
		return types.NewError(errNotReady, fmt.Sprintf(format, a...), "")
	}
	if err := loader.EnsureBPFFS(conf.PinRoot); err != nil {
		return nil, notReady("bpffs: %v", err)
	}
	if err := loader.CheckPins(conf.PinRoot); err != nil {
		return nil, notReady("pins: %v", err)
	}
	if !conf.builtin {
		if err := invoke.DelegateStatus(context.Background(), conf.IPAMConf.Type, args.StdinData, nil); err != nil {
			var ce *types.Error
			if errors.As(err, &ce) && (ce.Code == 50 || ce.Code == 51) {
				return nil, types.NewError(ce.Code, "ipam plugin "+conf.IPAMConf.Type+": "+ce.Msg, ce.Details)
			}
			return nil, notReady("ipam plugin %s: %v", conf.IPAMConf.Type, err)
		}
		return nil, nil
	}
	if conf.podCIDRErr != nil {
		return nil, notReady("ipam: %v", conf.podCIDRErr)
	}
	alloc, err := conf.allocator()
	if err != nil {
		return nil, notReady("ipam: %v", err)
	}
	free, err := alloc.Free()
	if err != nil {
		return nil, notReady("ipam: %v", err)
	}
	for i, n := range free {
		if n == 0 {
			return nil, notReady("ipam: range set %d (%s) has no free address", i, conf.sets[i])
		}
	}
	return nil, nil
}
