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
	n := network(conf)
	lk, err := n.Store().LockAttachment(args.ContainerID, args.IfName)
	if err != nil {
		return nil, err
	}
	err = n.Teardown(args.ContainerID, args.IfName, extra)
	if err != nil {
		lk.Release()
		return nil, err
	}
	lk.ReleaseAndRemove() // gone with the attachment
	return nil, nil
}
