package proxy

import (
	"math"
	"testing"
)

// binomialBounds is the range [lo, hi] of successes in n independent draws of
// probability p outside which a fair run lands with probability under miss (each
// tail under miss/2), from the exact binomial distribution. A share test with
// these bounds and miss = 1e-6 fails by chance once in a million fair runs; one
// with a fixed ±2 points at 3 standard deviations fails once in 370.
func binomialBounds(n int, p, miss float64) (lo, hi int) {
	lgn, _ := math.Lgamma(float64(n + 1))
	pmf := func(k int) float64 {
		a, _ := math.Lgamma(float64(k + 1))
		b, _ := math.Lgamma(float64(n - k + 1))
		return math.Exp(lgn - a - b + float64(k)*math.Log(p) + float64(n-k)*math.Log1p(-p))
	}
	tail := 0.0
	for lo = 0; lo < n && tail+pmf(lo) < miss/2; lo++ {
		tail += pmf(lo)
	}
	tail = 0
	for hi = n; hi > 0 && tail+pmf(hi) < miss/2; hi-- {
		tail += pmf(hi)
	}
	return lo, hi
}

// The bounds are the binomial's own: for 10 fair coins P(X ≤ 1) = 11/1024 and
// P(X ≤ 2) = 56/1024, so a 10% miss keeps [2, 8]; 2,000 draws of 10% at 1e-6 keep
// [138, 269], about 4.9 standard deviations (13.4) each side of 200.
func TestBinomialBounds(t *testing.T) {
	if lo, hi := binomialBounds(10, 0.5, 0.1); lo != 2 || hi != 8 {
		t.Errorf("10 fair coins at 10%%: [%d, %d], want [2, 8]", lo, hi)
	}
	// Computed apart with exact rational arithmetic (Python's fractions).
	if lo, hi := binomialBounds(2000, 0.1, 1e-6); lo != 138 || hi != 269 {
		t.Errorf("2000 draws of 10%% at 1e-6: [%d, %d], want [138, 269]", lo, hi)
	}
	if lo, hi := binomialBounds(3000, math.Pow(0.3, 5), 1e-6); lo != 0 || hi != 24 {
		t.Errorf("3000 draws of 0.3⁵ at 1e-6: [%d, %d], want [0, 24]", lo, hi)
	}
}
