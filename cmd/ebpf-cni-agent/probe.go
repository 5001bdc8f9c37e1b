package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// probe is the connectivity check shared by the kind e2e and the local
// emulated cluster (ci/checks.sh): `probe serve ADDR` echoes and prints the
// peer of every connection; `probe dial ADDR` connects, exchanges a line and
// prints the address the server saw (so masquerade is visible); `probe
// whoami ADDR` serves "<hostname> <client address>" (which backend of a
// Service answered); `probe connect ADDR` only completes a TCP handshake
// and prints the peer.
//
// UDP, with datagrams larger than an MTU (fragments): `probe udp-serve ADDR
// SIZE` answers every datagram with SIZE bytes starting with the sender's
// address; `probe udp-dial ADDR SIZE` sends SIZE bytes on a connected
// socket and prints "<bytes> <sender seen by the server> <peer>", or fails
// with "connection refused" when an ICMP error says the port is closed.
func probe(args []string) error {
	if len(args) == 3 && (args[0] == "udp-serve" || args[0] == "udp-dial") {
		size, err := strconv.Atoi(args[2])
		if err != nil || size < 64 || size > 65000 {
			return fmt.Errorf("probe %s: SIZE %q: want 64..65000", args[0], args[2])
		}
		if args[0] == "udp-serve" {
			return udpServe(args[1], size)
		}
		return udpDial(args[1], size)
	}
	if len(args) != 2 {
		return fmt.Errorf("usage: ebpf-cni-agent probe serve|whoami|dial|connect ADDR, probe udp-serve|udp-dial ADDR SIZE")
	}
	switch args[0] {
	case "serve":
		ln, err := net.Listen("tcp", args[1])
		if err != nil {
			return err
		}
		for {
			c, err := ln.Accept()
			if err != nil {
				return err
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				fmt.Fprintf(c, "%s\n", c.RemoteAddr().(*net.TCPAddr).IP)
			}()
		}
	case "whoami":
		// Like serve, naming the server too: "<hostname> <client address>".
		host, _ := os.Hostname()
		ln, err := net.Listen("tcp", args[1])
		if err != nil {
			return err
		}
		for {
			c, err := ln.Accept()
			if err != nil {
				return err
			}
			fmt.Fprintf(c, "%s %s\n", host, c.RemoteAddr().(*net.TCPAddr).IP)
			c.Close()
		}
	case "connect":
		// Only the TCP handshake (a server that speaks first or TLS).
		c, err := net.DialTimeout("tcp", args[1], 5*time.Second)
		if err != nil {
			return err
		}
		fmt.Println(c.RemoteAddr())
		return c.Close()
	case "dial":
		c, err := net.DialTimeout("tcp", args[1], 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		seen, err := io.ReadAll(c)
		if err != nil {
			return err
		}
		fmt.Print(string(seen))
		return nil
	}
	return fmt.Errorf("probe %q: want serve, whoami, dial, connect, udp-serve or udp-dial", args[0])
}

func udpServe(addr string, size int) error {
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return err
	}
	buf := make([]byte, 65536)
	for {
		_, from, err := pc.ReadFrom(buf)
		if err != nil {
			return err
		}
		reply := make([]byte, size)
		copy(reply, from.(*net.UDPAddr).AddrPort().Addr().Unmap().String()+" ")
		pc.WriteTo(reply, from)
	}
}

func udpDial(addr string, size int) error {
	c, err := net.Dial("udp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 65536)
	for try := 0; try < 5; try++ {
		if _, err := c.Write(make([]byte, size)); err != nil {
			return err
		}
		c.SetReadDeadline(time.Now().Add(time.Second))
		n, err := c.Read(buf)
		if errors.Is(err, syscall.ECONNREFUSED) {
			return err
		}
		if err != nil {
			continue // lost: again
		}
		seen, _, _ := strings.Cut(string(buf[:n]), " ")
		fmt.Printf("%d %s %s\n", n, seen, c.RemoteAddr())
		return nil
	}
	return fmt.Errorf("no answer from %s in 5 tries", addr)
}
