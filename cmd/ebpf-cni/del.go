package main

import (
	"net/netip"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/ebpf-cni/ebpf-cni/internal/config"
	"github.com/ebpf-cni/ebpf-cni/internal/ipam"
)

// cmdDel undoes ADD (endpoint.Net.Teardown) and keeps going past errors. It
// succeeds when repeated, when ADD never ran or failed half-way, and when
// the netns is gone: the addresses and map entries are released all the same.
func cmdDel(args *skel.CmdArgs, conf *config.NetConf) (types.Result, error) {
	var extra []netip.Addr
	if conf.PrevResult != nil {
		if res, err := current.NewResultFromResult(conf.PrevResult); err == nil {
			for _, ipc := range res.IPs {
				if p, ok := ipam.PrefixOf(ipc.Address); ok {
					extra = append(extra, p.Addr())
				}
			}
		}
	}
	return nil, network(conf).Teardown(args.ContainerID, args.IfName, extra)
}
