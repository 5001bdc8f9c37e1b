package maps_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// tryRun runs prog on frame; ok is false when the kernel refuses the frame
// as a test input (BPF_PROG_TEST_RUN checks IP header lengths before the
// program sees it, which a real device does not).
func tryRun(t *testing.T, prog *ebpf.Program, frame []byte) (uint32, []byte, bool) {
	out := make([]byte, len(frame)+256)
	ret, err := prog.Run(&ebpf.RunOptions{Data: frame, DataOut: out})
	if errors.Is(err, unix.EINVAL) {
		return 0, nil, false
	}
	if err != nil {
		t.Fatalf("run program: %v", err)
	}
	return ret, out[:len(frame)], true
}

func frameSrcIP(f []byte) (netip.Addr, bool) {
	if len(f) < 14 {
		return netip.Addr{}, false
	}
	switch binary.BigEndian.Uint16(f[12:]) {
	case 0x0800:
		if len(f) >= 34 {
			return netip.AddrFrom4([4]byte(f[26:30])), true
		}
	case 0x86dd:
		if len(f) >= 54 {
			return netip.AddrFrom16([16]byte(f[22:38])), true
		}
	}
	return netip.Addr{}, false
}

// from_pod on random frames: a frame not from the pod's MAC is always
// dropped, and nothing is redirected anywhere unless it came from the
// pod's own address, except the gateway replies turned back to the pod.
// (The verifier already proved every path memory-safe at load.)
func FuzzFromPod(f *testing.F) {
	for _, seed := range [][]byte{
		ipv4Frame(podMAC, podIP, peerIP), ipv6Frame(podMAC, podIP6, peerIP6),
		arpFrame(podMAC, podMAC, podIP, gw4), arpFrame(podMAC, podMAC, peerIP, gw4),
		icmp6Frame(hostMAC, podMAC, podLL, solicitd, 135, 0, gw6, 1, podMAC),
		icmp6Frame(hostMAC, podMAC, podLL, solicitd, 136, 0, peerIP6, 2, podMAC),
		udpFrame(hostMAC, podMAC, podIP, remotePod, 1, 2, 64, 0x2000, 8),
		tcpFrame(hostMAC, podMAC, podIP, peerIP, 1000, 80, 0x02),
		vlanFrame(podMAC), etherFrame(podMAC, 0x88cc),
	} {
		f.Add(seed)
	}
	objs, m := load(f)
	if err := m.PutCluster(cluster); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, frame []byte) {
		if len(frame) < 14 {
			return // the kernel runs tc programs on Ethernet frames only
		}
		got, out, ok := tryRun(t, objs.FromPod, frame)
		if !ok {
			return
		}
		if !bytes.Equal(frame[6:12], podMAC) && got != actShot {
			t.Fatalf("frame from MAC %x: verdict %d, want drop", frame[6:12], int32(got))
		}
		if got != actRedirect {
			return
		}
		turnedBack := bytes.Equal(out[0:6], podMAC) && bytes.Equal(out[6:12], hostMAC)
		if src, ok := frameSrcIP(frame); !turnedBack && (!ok || (src != podIP && src != podIP6)) {
			t.Fatalf("redirected a frame from %v (pod is %s / %s): %x", src, podIP, podIP6, frame)
		}
	})
}

// from_node on random frames: a redirect only ever delivers to a local pod
// a packet from the cluster's pod ranges.
func FuzzFromNode(f *testing.F) {
	for _, seed := range [][]byte{
		udpFrame(lo, peerHost, remotePod, peerIP, 1, 2, 64, 0, 8),
		udpFrame(lo, peerHost, remotePod6, peerIP6, 1, 2, 64, 0, 8),
		udpFrame(lo, peerHost, outsider, peerIP, 1, 2, 64, 0, 8),
		udpFrame(lo, peerHost, remotePod, peerIP, 1, 2, 64, 0x0010, 8),
	} {
		f.Add(seed)
	}
	objs, m := load(f)
	if err := m.PutCluster(cluster); err != nil {
		f.Fatal(err)
	}
	in := func(a netip.Addr) bool {
		for _, p := range cluster {
			if p.Contains(a) {
				return true
			}
		}
		return false
	}
	f.Fuzz(func(t *testing.T, frame []byte) {
		if len(frame) < 14 {
			return
		}
		got, out, ok := tryRun(t, objs.FromNode, frame)
		if !ok {
			return
		}
		if got != actRedirect {
			return
		}
		src, ok := frameSrcIP(frame)
		if !ok || !in(src) {
			t.Fatalf("redirected a packet from %v, outside the cluster: %x", src, frame)
		}
		if !bytes.Equal(out[0:6], peerPod) {
			t.Fatalf("redirected to MAC %x, not the local pod's", out[0:6])
		}
	})
}
