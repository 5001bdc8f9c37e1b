// Command rr is a TCP request/response benchmark in the style of netperf's
// TCP_RR: one connection, a 1-byte request answered by a 1-byte response,
// as fast as possible. It reports transactions per second and the p50/p99
// latency of one transaction.
//
//	rr -listen 10.0.0.2:7000            serve (until killed)
//	rr -connect 10.0.0.2:7000 -d 3s      measure, print JSON
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"time"
)

// Result is what the client prints.
type Result struct {
	Transactions int     `json:"transactions"`
	TPS          float64 `json:"tps"`
	P50us        float64 `json:"p50_us"`
	P99us        float64 `json:"p99_us"`
}

func main() {
	listen := flag.String("listen", "", "serve on this address")
	connect := flag.String("connect", "", "measure against this server")
	dur := flag.Duration("d", 3*time.Second, "measurement duration")
	flag.Parse()
	var err error
	switch {
	case *listen != "":
		err = serve(*listen)
	case *connect != "":
		var r Result
		r, err = measure(*connect, *dur)
		if err == nil {
			err = json.NewEncoder(os.Stdout).Encode(r)
		}
	default:
		err = fmt.Errorf("need -listen or -connect")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "rr:", err)
		os.Exit(1)
	}
}

func serve(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Println("ready")
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			c.(*net.TCPConn).SetNoDelay(true)
			buf := make([]byte, 1)
			for {
				if _, err := io.ReadFull(c, buf); err != nil {
					return
				}
				if _, err := c.Write(buf); err != nil {
					return
				}
			}
		}()
	}
}

func measure(addr string, dur time.Duration) (Result, error) {
	var c net.Conn
	var err error
	for i := 0; i < 50; i++ { // the server may still be starting
		if c, err = net.DialTimeout("tcp", addr, time.Second); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		return Result{}, err
	}
	defer c.Close()
	c.(*net.TCPConn).SetNoDelay(true)
	buf := []byte{'x'}
	lat := make([]time.Duration, 0, 1<<20)
	start := time.Now()
	end := start.Add(dur)
	for {
		t0 := time.Now()
		if !t0.Before(end) {
			break
		}
		if _, err := c.Write(buf); err != nil {
			return Result{}, err
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return Result{}, err
		}
		lat = append(lat, time.Since(t0))
	}
	elapsed := time.Since(start)
	if len(lat) == 0 {
		return Result{}, fmt.Errorf("no transaction completed")
	}
	slices.Sort(lat)
	pct := func(p float64) float64 {
		return float64(lat[int(p*float64(len(lat)-1))].Nanoseconds()) / 1e3
	}
	return Result{
		Transactions: len(lat),
		TPS:          float64(len(lat)) / elapsed.Seconds(),
		P50us:        pct(0.50),
		P99us:        pct(0.99),
	}, nil
}
