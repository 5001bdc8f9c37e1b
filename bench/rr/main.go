// Command rr is a TCP request/response benchmark in the style of netperf's
// TCP_RR and TCP_CRR, and a probe that waits for an address to answer.
//
//	rr -listen 10.0.0.2:7000                 serve (until killed)
//	rr -connect 10.0.0.2:7000 -d 3s          TCP_RR: one connection, 1-byte request and
//	                                         response as fast as possible; print JSON
//	rr -connect 10.0.0.2:7000 -crr -cpu 0    TCP_CRR: a new connection per transaction
//	rr -probe 10.96.0.10:7000 -timeout 2m    print "waiting" after the first failed attempt,
//	                                         then JSON with the time it first answered
//
// TCP_RR and TCP_CRR report transactions per second and the p50/p99 latency
// of one transaction. The server is the same for both: it reads one byte and
// answers one byte until the peer closes.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// Result is what the client prints.
type Result struct {
	Transactions int     `json:"transactions"`
	TPS          float64 `json:"tps"`
	P50us        float64 `json:"p50_us"`
	P99us        float64 `json:"p99_us"`
	Errors       int     `json:"errors,omitempty"` // TCP_CRR: transactions that failed (connect refused, timed out, reset)
}

// Answer is what the probe prints once the address answered.
type Answer struct {
	UnixNano int64 `json:"unix_ns"` // when the first exchange completed
	Attempts int   `json:"attempts"`
}

func main() {
	listen := flag.String("listen", "", "serve on this address")
	connect := flag.String("connect", "", "measure against this server")
	probeAddr := flag.String("probe", "", "try this address until a 1-byte exchange succeeds, then print when")
	crrMode := flag.Bool("crr", false, "with -connect: TCP_CRR (socket, connect, 1-byte request/response, close per transaction)")
	cpu := flag.Int("cpu", -1, "pin the measuring thread to this CPU (-1: leave it to the scheduler or taskset)")
	dur := flag.Duration("d", 3*time.Second, "measurement duration")
	timeout := flag.Duration("timeout", time.Minute, "-probe: give up after this long")
	every := flag.Duration("every", 5*time.Millisecond, "-probe: pause between attempts")
	flag.Parse()
	var err error
	switch {
	case *listen != "":
		err = serve(*listen)
	case *probeAddr != "":
		var a Answer
		if a, err = probe(*probeAddr, *timeout, *every); err == nil {
			err = json.NewEncoder(os.Stdout).Encode(a)
		}
	case *connect != "":
		var r Result
		if *crrMode {
			r, err = crr(*connect, *dur, *cpu)
		} else {
			r, err = measure(*connect, *dur, *cpu)
		}
		if err == nil {
			err = json.NewEncoder(os.Stdout).Encode(r)
		}
	default:
		err = fmt.Errorf("need -listen, -connect or -probe")
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

// pin locks the calling goroutine to its thread and, with cpu ≥ 0, that
// thread to one CPU: the same client placement for every setup.
func pin(cpu int) error {
	runtime.LockOSThread()
	if cpu < 0 {
		return nil
	}
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return fmt.Errorf("pin to CPU %d: %w", cpu, err)
	}
	return nil
}

func measure(addr string, dur time.Duration, cpu int) (Result, error) {
	if cpu >= 0 { // locking costs TCP_RR a thread hand-off per wake-up: only on request
		if err := pin(cpu); err != nil {
			return Result{}, err
		}
	}
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
	// Close with a reset, like TCP_CRR: a FIN close leaves the flow in
	// TIME_WAIT in the conntrack of a node that NATed it for 120 s, and a
	// later connection from the same port to another Service with the same
	// backend then clashes with it (conntrack gives it another source
	// port). The bench's own connections must not set up that case by
	// accident: it is a datapath case of its own, not a rate.
	c.(*net.TCPConn).SetLinger(0)
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
	return result(lat, time.Since(start), 0)
}

// crr is TCP_CRR with raw blocking syscalls on a locked, pinned thread (no
// netpoller between the client and the kernel). Each transaction: socket,
// connect, write 1 byte, read 1 byte, close with SO_LINGER {1, 0}: the close
// sends a RST and leaves no TIME_WAIT, so the ephemeral ports (28k by
// default, 60 s in TIME_WAIT) never run out whatever the rate.
func crr(addr string, dur time.Duration, cpu int) (Result, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return Result{}, err
	}
	if !ap.Addr().Is4() {
		return Result{}, fmt.Errorf("-crr: IPv4 only, got %s", addr)
	}
	if err := pin(cpu); err != nil {
		return Result{}, err
	}
	sa := &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	// A connect or read that hangs (a lost SYN, a black hole) fails after
	// this instead of stalling the run; it counts as an error.
	tv := unix.Timeval{Sec: 1}
	buf := []byte{'x'}
	lat := make([]time.Duration, 0, 1<<20)
	var errs int
	var firstErr error
	start := time.Now()
	end := start.Add(dur)
	for {
		t0 := time.Now()
		if !t0.Before(end) {
			break
		}
		if err := crrOnce(sa, &tv, buf); err != nil {
			if firstErr == nil {
				firstErr = err
			}
			errs++
			if errs > 1000 && len(lat) == 0 {
				return Result{}, fmt.Errorf("no transaction completed, %d errors, first: %w", errs, firstErr)
			}
			continue
		}
		lat = append(lat, time.Since(t0))
	}
	if errs > 0 {
		fmt.Fprintf(os.Stderr, "rr: %d failed transactions, first: %v\n", errs, firstErr)
	}
	return result(lat, time.Since(start), errs)
}

func crrOnce(sa *unix.SockaddrInet4, tv *unix.Timeval, buf []byte) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0}); err != nil {
		return fmt.Errorf("SO_LINGER: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		return fmt.Errorf("TCP_NODELAY: %w", err)
	}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, tv); err != nil {
		return fmt.Errorf("SO_SNDTIMEO: %w", err)
	}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, tv); err != nil {
		return fmt.Errorf("SO_RCVTIMEO: %w", err)
	}
	if err := connect(fd, sa); err != nil {
		if la, lerr := unix.Getsockname(fd); lerr == nil {
			if a, ok := la.(*unix.SockaddrInet4); ok {
				return fmt.Errorf("%w (from port %d)", err, a.Port)
			}
		}
		return err
	}
	if _, err := retry(func() (int, error) { return unix.Write(fd, buf) }); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	n, err := retry(func() (int, error) { return unix.Read(fd, buf) })
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if n != 1 {
		return fmt.Errorf("read: connection closed by the server")
	}
	return nil
}

// connect is a blocking connect. Go's signal handlers are SA_RESTART, but a
// connect interrupted anyway goes on in the background: wait for it.
func connect(fd int, sa unix.Sockaddr) error {
	err := unix.Connect(fd, sa)
	if errors.Is(err, unix.EINTR) {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		if _, err = retry(func() (int, error) { return unix.Poll(pfd, 1000) }); err == nil {
			var soerr int
			if soerr, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); err == nil && soerr != 0 {
				err = unix.Errno(soerr)
			}
		}
	}
	if errors.Is(err, unix.EINPROGRESS) { // SO_SNDTIMEO expired
		err = unix.ETIMEDOUT
	}
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	return nil
}

func retry(f func() (int, error)) (int, error) {
	for {
		n, err := f()
		if !errors.Is(err, unix.EINTR) {
			return n, err
		}
	}
}

func result(lat []time.Duration, elapsed time.Duration, errs int) (Result, error) {
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
		Errors:       errs,
	}, nil
}

// probe tries a 1-byte exchange with addr until one succeeds. Every attempt
// is a new connection (a new socket, so a Service programmed meanwhile is
// seen: socket-level load balancing translates at connect time, kube-proxy
// matches the new flow's first packet).
func probe(addr string, timeout, every time.Duration) (Answer, error) {
	deadline := time.Now().Add(timeout)
	buf := []byte{'p'}
	var last error
	for attempts := 1; time.Now().Before(deadline); attempts++ {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.(*net.TCPConn).SetLinger(0) // as in measure
			c.SetDeadline(time.Now().Add(500 * time.Millisecond))
			if _, err = c.Write(buf); err == nil {
				_, err = io.ReadFull(c, buf)
			}
			c.Close()
			if err == nil {
				return Answer{UnixNano: time.Now().UnixNano(), Attempts: attempts}, nil
			}
		}
		if last == nil {
			// The caller starts the change it times only once the address
			// is known not to answer yet.
			fmt.Println("waiting")
		}
		last = err
		time.Sleep(every)
	}
	return Answer{}, fmt.Errorf("%s did not answer within %s: %w", addr, timeout, last)
}
