// The history: every run appends its goal figures to one tab-separated file, with
// the time, the commit and the kind of run, so a regression shows as a change from
// one run to the next; results/history.md is the same as a table, rewritten each time.

package bench

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// HistoryFile is where `ferry bench` appends and `ferry bench history` reads.
const HistoryFile = "results/history.tsv"

// historyHeader names the columns of HistoryFile.
const historyHeader = "time_utc\tcommit\tdirty\trun\tgoal\tvalue\ttarget\tcmp\tstatus"

// HistoryRow is one goal of one run.
type HistoryRow struct {
	Time   time.Time
	Commit string
	Dirty  bool
	Run    string // "quick" or "full", "-subset" added for a run with --only or --scenarios
	Goal   string
	// Value is empty when the goal was not measured.
	Value   *float64
	Target  float64
	Cmp     string // ≥ or ≤
	Status  string
	Unknown bool // the row did not parse (kept out of tables)
}

// HistoryRows are the rows one run appends.
func HistoryRows(res *Results, gs []Goal, commit string, dirty bool) []HistoryRow {
	run := "full"
	if res.Plan.Quick {
		run = "quick"
	}
	if res.Plan.Selected {
		run += "-subset"
	}
	var rows []HistoryRow
	for _, g := range gs {
		r := HistoryRow{Time: res.Start.UTC().Truncate(time.Second), Commit: commit, Dirty: dirty, Run: run,
			Goal: g.Key, Target: g.Target, Cmp: g.cmp(), Status: g.Status()}
		if g.Measured {
			v := g.Value
			r.Value = &v
		}
		rows = append(rows, r)
	}
	return rows
}

func (r HistoryRow) tsv() string {
	v := ""
	if r.Value != nil {
		v = strconv.FormatFloat(*r.Value, 'g', 6, 64)
	}
	return strings.Join([]string{r.Time.Format(time.RFC3339), r.Commit, strconv.FormatBool(r.Dirty), r.Run, r.Goal, v,
		strconv.FormatFloat(r.Target, 'g', 6, 64), r.Cmp, r.Status}, "\t")
}

// AppendHistory appends rows to the file (creating it with a header) and rewrites
// history.md beside it from the whole file.
func AppendHistory(file string, rows []HistoryRow) error {
	if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
		return fmt.Errorf("history: %w", err)
	}
	f, err := os.OpenFile(file, os.O_CREATE|os.O_APPEND|os.O_RDWR, 0o644)
	if err != nil {
		return fmt.Errorf("history: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("history: %w", err)
	}
	var b strings.Builder
	if st.Size() == 0 {
		b.WriteString(historyHeader + "\n")
	}
	for _, r := range rows {
		b.WriteString(r.tsv() + "\n")
	}
	if _, err := f.WriteString(b.String()); err != nil {
		return fmt.Errorf("history: %w", err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("history: %w", err)
	}
	all, err := ReadHistory(f)
	if err != nil {
		return err
	}
	var md strings.Builder
	md.WriteString("# Benchmark history\n\nGoal figures of every `ferry bench` run, appended by the run (from history.tsv). Δ is the change from the previous run of the same kind.\n\n")
	if err := WriteHistoryTable(&md, all, ""); err != nil {
		return err
	}
	return os.WriteFile(strings.TrimSuffix(file, filepath.Ext(file))+".md", []byte(md.String()), 0o644)
}

// ReadHistory parses a history file.
func ReadHistory(r io.Reader) ([]HistoryRow, error) {
	var rows []HistoryRow
	sc := bufio.NewScanner(r)
	first := true
	for sc.Scan() {
		line := sc.Text()
		if first {
			first = false
			if line != historyHeader {
				return nil, errors.New("history: not a history file (header differs)")
			}
			continue
		}
		if strings.TrimSpace(line) == "" {
			continue
		}
		rows = append(rows, parseHistoryRow(line))
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	return rows, nil
}

func parseHistoryRow(line string) HistoryRow {
	f := strings.Split(line, "\t")
	if len(f) != 9 {
		return HistoryRow{Unknown: true}
	}
	t, err1 := time.Parse(time.RFC3339, f[0])
	dirty, err2 := strconv.ParseBool(f[2])
	target, err3 := strconv.ParseFloat(f[6], 64)
	if err1 != nil || err2 != nil || err3 != nil {
		return HistoryRow{Unknown: true}
	}
	r := HistoryRow{Time: t, Commit: f[1], Dirty: dirty, Run: f[3], Goal: f[4], Target: target, Cmp: f[7], Status: f[8]}
	if f[5] != "" {
		v, err := strconv.ParseFloat(f[5], 64)
		if err != nil {
			return HistoryRow{Unknown: true}
		}
		r.Value = &v
	}
	return r
}

// WriteHistoryTable writes rows as a markdown table grouped by goal, oldest run
// first, with the change from the previous run of the same kind (quick runs are
// compared with quick runs). goal, when set, keeps the goals whose key contains it.
func WriteHistoryTable(w io.Writer, rows []HistoryRow, goal string) error {
	var keep []HistoryRow
	var goals []string
	for _, r := range rows {
		if r.Unknown || !strings.Contains(r.Goal, goal) {
			continue
		}
		keep = append(keep, r)
		if !slices.Contains(goals, r.Goal) {
			goals = append(goals, r.Goal)
		}
	}
	slices.SortStableFunc(keep, func(a, b HistoryRow) int {
		if c := slices.Index(goals, a.Goal) - slices.Index(goals, b.Goal); c != 0 {
			return c
		}
		return a.Time.Compare(b.Time)
	})
	var b strings.Builder
	b.WriteString("| goal | time (UTC) | commit | run | value | target | status | Δ |\n|---|---|---|---|---|---|---|---|\n")
	prev := map[[2]string]float64{}
	for _, r := range keep {
		commit := r.Commit
		if r.Dirty {
			commit += " (dirty)"
		}
		v, delta := "–", "–"
		k := [2]string{r.Goal, r.Run}
		if r.Value != nil {
			v = strconv.FormatFloat(*r.Value, 'f', 3, 64)
			if p, ok := prev[k]; ok && p != 0 {
				delta = fmt.Sprintf("%+.1f%%", (*r.Value-p)/p*100)
			}
			prev[k] = *r.Value
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s %s | %s | %s |\n", r.Goal, r.Time.UTC().Format("2006-01-02 15:04"), commit, r.Run, v,
			r.Cmp, strconv.FormatFloat(r.Target, 'f', -1, 64), r.Status, delta)
	}
	_, err := io.WriteString(w, b.String())
	return err
}
