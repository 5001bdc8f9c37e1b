package main

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ebpf-cni/ebpf-cni/internal/loader"
)

// churnResult is one plugin at one pod count.
type churnResult struct {
	pods                 int
	addP50, addP99       time.Duration
	delP50, delP99       time.Duration
	parallel50           time.Duration // 50 parallel ADDs, wall time (level 0 only)
	addRSSKiB, delRSSKiB int64         // plugin process, one direct call (level 0 only)
	mapBytes             int64         // pinned maps' memlock (ebpf-cni only)
}

func runChurn(e *env, rep *report) error {
	var lv []int
	for _, f := range strings.Split(*levels, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			return fmt.Errorf("-levels: %w", err)
		}
		lv = append(lv, n)
	}
	nets, err := pluginNetworks(e, "c", 220)
	if err != nil {
		return err
	}
	rep.churn = map[string][]churnResult{}
	for _, n := range nets {
		rep.churnOrder = append(rep.churnOrder, n.label)
		var background []*benchPod
		seq := 0
		for _, level := range lv {
			// Fill the node up to this level, 4 ADDs at a time.
			missing := level - len(background)
			if missing > 0 {
				fmt.Printf("bench: %s: adding %d pods\n", n.label, missing)
				fresh := make([]*benchPod, missing)
				err := parallel(missing, 4, func(i int) error {
					ns := fmt.Sprintf("%s-bg%d", n.name, len(background)+i)
					if err := e.newNS(ns); err != nil {
						return err
					}
					p, _, err := e.add(n, ns)
					fresh[i] = p
					return err
				})
				if err != nil {
					return err
				}
				background = append(background, fresh...)
			}
			res := churnResult{pods: level}
			var adds, dels []time.Duration
			for i := 0; i < *samples; i++ {
				seq++
				ns := fmt.Sprintf("%s-s%d", n.name, seq)
				if err := e.newNS(ns); err != nil {
					return err
				}
				p, da, err := e.add(n, ns)
				if err != nil {
					return err
				}
				dd, err := e.del(p)
				if err != nil {
					return err
				}
				exec.Command("ip", "netns", "del", ns).Run()
				adds, dels = append(adds, da), append(dels, dd)
			}
			res.addP50, res.addP99 = pctl(adds, 0.5), pctl(adds, 0.99)
			res.delP50, res.delP99 = pctl(dels, 0.5), pctl(dels, 0.99)
			if level == 0 {
				if err := parallelAdds(e, n, &res); err != nil {
					return err
				}
				if err := footprint(e, n, &res); err != nil {
					return err
				}
			}
			if n.conf["type"] == "ebpf-cni" {
				res.mapBytes = mapMemory()
			}
			fmt.Printf("bench: %-22s %5d pods: ADD p50 %6.1f ms p99 %6.1f ms, DEL p50 %6.1f ms p99 %6.1f ms\n",
				n.label, level, ms(res.addP50), ms(res.addP99), ms(res.delP50), ms(res.delP99))
			rep.churn[n.label] = append(rep.churn[n.label], res)
		}
		fmt.Printf("bench: %s: removing %d pods\n", n.label, len(background))
		if err := parallel(len(background), 4, func(i int) error {
			if _, err := e.del(background[i]); err != nil {
				return err
			}
			return exec.Command("ip", "netns", "del", background[i].ns).Run()
		}); err != nil {
			return err
		}
	}
	return nil
}

func parallelAdds(e *env, n *network, res *churnResult) error {
	pods := make([]*benchPod, 50)
	for i := range pods {
		if err := e.newNS(fmt.Sprintf("%s-p%d", n.name, i)); err != nil {
			return err
		}
	}
	start := time.Now()
	err := parallel(50, 50, func(i int) error {
		p, _, err := e.add(n, fmt.Sprintf("%s-p%d", n.name, i))
		pods[i] = p
		return err
	})
	res.parallel50 = time.Since(start)
	if err != nil {
		return err
	}
	return parallel(50, 4, func(i int) error {
		if _, err := e.del(pods[i]); err != nil {
			return err
		}
		return exec.Command("ip", "netns", "del", pods[i].ns).Run()
	})
}

// footprint measures the plugin process's max RSS for one ADD and one DEL.
func footprint(e *env, n *network, res *churnResult) error {
	ns := n.name + "-rss"
	if err := e.newNS(ns); err != nil {
		return err
	}
	defer exec.Command("ip", "netns", "del", ns).Run()
	bin := "/usr/lib/cni/" + n.conf["type"].(string)
	if n.conf["type"] == "ebpf-cni" {
		bin = *plugin
	}
	var err error
	if res.addRSSKiB, err = e.direct(bin, "ADD", "ebb-rss", ns, n.stdin()); err != nil {
		return err
	}
	res.delRSSKiB, err = e.direct(bin, "DEL", "ebb-rss", ns, n.stdin())
	return err
}

// mapMemory sums bytes_memlock of the pinned maps, as bpftool reports it.
func mapMemory() int64 {
	var total int64
	for _, m := range loader.MapNames() {
		out, err := exec.Command("bpftool", "-j", "map", "show", "pinned", pinRoot+"/"+m).Output()
		if err != nil {
			continue
		}
		var info struct {
			Bytes int64 `json:"bytes_memlock"`
		}
		if json.Unmarshal(out, &info) == nil {
			total += info.Bytes
		}
	}
	return total
}

func pctl(d []time.Duration, p float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[int(p*float64(len(s)-1)+0.5)]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
