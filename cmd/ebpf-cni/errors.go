package main

import (
	"errors"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/ebpf-cni/ebpf-cni/internal/config"
	"github.com/ebpf-cni/ebpf-cni/internal/flock"
	"github.com/ebpf-cni/ebpf-cni/internal/ipam"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/node"
	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

const (
	// errNotReady is STATUS's "cannot serve ADD" (the spec's 50).
	errNotReady uint = 50
	// errImpaired is STATUS's "cannot serve ADD, and existing pods may be
	// impaired" (the spec's 51).
	errImpaired uint = 51
	// errIPAMExhausted is ours (the spec leaves 100+ to plugins).
	errIPAMExhausted uint = 100
)

// toCNI is the one place internal errors become CNI error objects.
func toCNI(err error) error {
	if err == nil {
		return nil
	}
	var ce *types.Error
	if errors.As(err, &ce) {
		if ce == err {
			return ce
		}
		// Keep the code, and the context wrapped around it.
		return types.NewError(ce.Code, err.Error(), ce.Details)
	}
	var fe *config.FieldError
	var de *config.DecodeError
	var ae *config.ArgsError
	switch {
	case errors.As(err, &fe):
		return types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
	case errors.As(err, &de):
		return types.NewError(types.ErrDecodingFailure, err.Error(), "")
	case errors.As(err, &ae):
		return types.NewError(types.ErrInvalidEnvironmentVariables, err.Error(), "")
	case errors.Is(err, flock.ErrTimeout): // also ipam.ErrLockTimeout
		return types.NewError(types.ErrTryAgainLater, err.Error(), "another CNI call holds the node lock; try again later")
	case errors.Is(err, node.ErrUnknown):
		return types.NewError(types.ErrTryAgainLater, err.Error(), "the node's podCIDR is not known yet; try again later")
	case errors.Is(err, loader.ErrNoBPFFS):
		return types.NewError(types.ErrTryAgainLater, err.Error(), "bpffs is not mounted; try again later")
	case errors.Is(err, veth.ErrNetNS):
		return types.NewError(types.ErrInvalidNetNS, "CNI_NETNS: "+err.Error(), "")
	case errors.Is(err, veth.ErrIfExists):
		return types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_IFNAME: "+err.Error(), "")
	case errors.Is(err, ipam.ErrExhausted):
		return types.NewError(errIPAMExhausted, err.Error(), "no free address in the ipam ranges")
	}
	return types.NewError(types.ErrInternal, err.Error(), "")
}
