// Command ebpf-cni is a CNI plugin whose datapath is eBPF: veth pairs with
// no bridge, tc programs that redirect same-node pod traffic straight into
// the destination pod, and pinned maps that outlive the plugin.
//
// Run by a runtime (CNI_COMMAND set) it serves ADD, DEL, CHECK, STATUS, GC
// and VERSION; run by a person with arguments it serves `inspect`. Each verb
// is one file; the model it works on lives in internal/ (config, endpoint,
// ipam, loader, maps, veth, nat).
package main

import (
	"os"
	"runtime"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/ebpf-cni/ebpf-cni/internal/config"
)

func main() {
	// Netlink handles and namespace switches belong to one OS thread.
	runtime.LockOSThread()
	if os.Getenv("CNI_COMMAND") == "" && len(os.Args) > 1 {
		os.Exit(runCLI(os.Args[1:], os.Stdout, os.Stderr))
	}
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add:    logged("ADD", cmdAdd),
		Del:    logged("DEL", cmdDel),
		Check:  logged("CHECK", cmdCheck),
		GC:     logged("GC", cmdGC),
		Status: logged("STATUS", cmdStatus),
	}, config.SupportedVersions, "ebpf-cni: eBPF CNI plugin (veth + tc redirect, no bridge)")
}
