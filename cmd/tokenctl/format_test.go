package main

import (
	"testing"
	"time"
)

func TestHumanDuration(t *testing.T) {
	tests := []struct {
		in   time.Duration
		want string
	}{
		{0, "0s"},
		{400 * time.Millisecond, "0s"},
		{600 * time.Millisecond, "1s"},
		{59 * time.Second, "59s"},
		{59*time.Second + 700*time.Millisecond, "1m"},
		{41*time.Minute + 12*time.Second, "41m12s"},
		{2*time.Hour + 3*time.Minute + 59*time.Second, "2h3m"},
		{2 * time.Hour, "2h"},
		{26*time.Hour + 5*time.Minute, "1d2h"},
		{48 * time.Hour, "2d"},
		{-3 * time.Minute, "3m"},
	}
	for _, tt := range tests {
		t.Run(tt.in.String(), func(t *testing.T) {
			if got := humanDuration(tt.in); got != tt.want {
				t.Errorf("humanDuration(%v) = %q, want %q", tt.in, got, tt.want)
			}
		})
	}
}

func TestTruncate(t *testing.T) {
	tests := []struct {
		in   string
		max  int
		want string
	}{
		{"chat:read", 24, "chat:read"},
		{"chat:read,chat:write,forums:read", 24, "chat:read,chat:write,fo…"},
		{"abcdef", 6, "abcdef"},
		{"abcdefg", 6, "abcde…"},
	}
	for _, tt := range tests {
		if got := truncate(tt.in, tt.max); got != tt.want {
			t.Errorf("truncate(%q, %d) = %q, want %q", tt.in, tt.max, got, tt.want)
		}
	}
}
