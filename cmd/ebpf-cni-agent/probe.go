package main

import (
	"fmt"
	"io"
	"net"
	"time"
)

// probe is the connectivity check shared by the kind e2e and the local
// emulated cluster (ci/checks.sh): `probe serve ADDR` echoes and prints the
// peer of every connection; `probe dial ADDR` connects, exchanges a line and
// prints the address the server saw (so masquerade is visible).
func probe(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("usage: ebpf-cni-agent probe serve|dial ADDR")
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
	return fmt.Errorf("probe %q: want serve or dial", args[0])
}
