package cache

import (
	"bytes"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/tokend/tokend/internal/clock"
	storev1 "github.com/tokend/tokend/proto/tokend/store/v1"
)

var (
	sealKeyA = bytes.Repeat([]byte{0xA}, 32)
	sealKeyB = bytes.Repeat([]byte{0xB}, 32)
)

// sealedSecret looks like a Whop token; its middle is what the raw file
// must never contain.
const sealedSecret = "eyJhbGciOiJIUzI1NiJ9.sealed-token-under-test.c2lnbmF0dXJl"

func sealConfig(t *testing.T, key []byte) Config {
	cfg := testConfig(t, clock.NewFake(t0))
	cfg.SealKey = key
	return cfg
}

// storedRecord unmarshals the value under k in a closed file, as stored.
func storedRecord(t *testing.T, path string, k Key) *storev1.Record {
	t.Helper()
	v, ok := fileValues(t, path)[enc(k)]
	if !ok {
		t.Fatalf("%s holds no record for %s", path, k.ID())
	}
	var p storev1.Record
	if err := proto.Unmarshal(v, &p); err != nil {
		t.Fatalf("unmarshal %s: %v", k.ID(), err)
	}
	return &p
}

func TestSealKeyLength(t *testing.T) {
	tests := []struct {
		name string
		key  []byte
		ok   bool
	}{
		{"none", nil, true},
		{"32 bytes", sealKeyA, true},
		{"5 bytes", []byte("short"), false},
		{"31 bytes", sealKeyA[:31], false},
		{"33 bytes", append(bytes.Clone(sealKeyA), 0), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := sealConfig(t, tt.key)
			s, _, err := Open(cfg)
			if err == nil {
				s.Close()
			}
			if tt.ok && err != nil {
				t.Fatalf("Open with a %d-byte key: %v", len(tt.key), err)
			}
			if !tt.ok && (err == nil || !strings.Contains(err.Error(), "want 32")) {
				t.Fatalf("Open with a %d-byte key = %v, want an error asking for 32 bytes", len(tt.key), err)
			}
		})
	}
}

// TestSealedTokensAtRest: with a key, no token string reaches the file,
// not even one that was overwritten. Without a key the same check finds
// the token, which shows the check can see one.
func TestSealedTokensAtRest(t *testing.T) {
	tests := []struct {
		name      string
		key       []byte
		wantPlain bool
	}{
		{"sealed", sealKeyA, false},
		{"plain", nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := sealConfig(t, tt.key)
			s, _, closeS := openStore(t, cfg)
			k := NewKey("default", "biz_seal", "", []string{"chat:read"})
			s.Put(enc(k), record(k, "first-"+sealedSecret, t0.Add(time.Hour)))
			mustFlush(t, s)
			s.Put(enc(k), record(k, sealedSecret, t0.Add(time.Hour)))
			closeS()

			raw, err := os.ReadFile(cfg.Path)
			if err != nil {
				t.Fatal(err)
			}
			if got := bytes.Contains(raw, []byte("sealed-token-under-test")); got != tt.wantPlain {
				t.Fatalf("raw file holds the token string: %v, want %v", got, tt.wantPlain)
			}
			p := storedRecord(t, cfg.Path, k)
			if sealed := p.Token == "" && len(p.SealedToken) > 0; sealed == tt.wantPlain {
				t.Errorf("stored record: token %q, %d sealed bytes; want sealed = %v", p.Token, len(p.SealedToken), !tt.wantPlain)
			}

			s, stats, _ := openStore(t, cfg)
			if got := s.Loaded(); stats != (LoadStats{Loaded: 1}) || len(got) != 1 || got[0].Token != sealedSecret {
				t.Errorf("reopen with the same key: LoadStats = %+v, Loaded = %+v; want the token back", stats, got)
			}
		})
	}
}

// TestSealedUnderAnotherKey: a record sealed under one key is Unsealable
// with another or with none, and is dropped from the file.
func TestSealedUnderAnotherKey(t *testing.T) {
	tests := []struct {
		name string
		key  []byte
	}{
		{"another key", sealKeyB},
		{"no key", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := sealConfig(t, sealKeyA)
			s, _, closeS := openStore(t, cfg)
			k := NewKey("default", "biz_seal", "", nil)
			s.Put(enc(k), record(k, sealedSecret, t0.Add(time.Hour)))
			closeS()

			cfg.SealKey = tt.key
			s, stats, closeS := openStore(t, cfg)
			if want := (LoadStats{Unsealable: 1}); stats != want {
				t.Errorf("LoadStats = %+v, want %+v", stats, want)
			}
			if got := s.Loaded(); len(got) != 0 {
				t.Errorf("Loaded %d records that no key here opens", len(got))
			}
			closeS()
			if n := len(fileValues(t, cfg.Path)); n != 0 {
				t.Errorf("file holds %d records after Open, want the unsealable one dropped", n)
			}
		})
	}
}

// TestPlainRecordResealed: a record written before a key was configured is
// sealed by the first write after Open with the key.
func TestPlainRecordResealed(t *testing.T) {
	cfg := sealConfig(t, nil)
	s, _, closeS := openStore(t, cfg)
	k := NewKey("default", "biz_seal", "", []string{"chat:read"})
	s.Put(enc(k), record(k, sealedSecret, t0.Add(time.Hour)))
	closeS()
	if p := storedRecord(t, cfg.Path, k); p.Token != sealedSecret {
		t.Fatalf("without a key: stored token %q, want it plain", p.Token)
	}

	cfg.SealKey = sealKeyA
	s, stats, closeS := openStore(t, cfg)
	if got := s.Loaded(); stats != (LoadStats{Loaded: 1}) || len(got) != 1 || got[0].Token != sealedSecret {
		t.Fatalf("open plain file with a key: LoadStats = %+v, Loaded = %+v", stats, got)
	}
	if pending, _ := s.WriteStatus(); pending != 1 {
		t.Errorf("after Open with a key: pending = %d, want the plain record queued to be sealed", pending)
	}
	mustFlush(t, s)
	closeS()
	// bbolt does not zero freed pages, so the raw file may still hold the
	// old plain copy until the page is reused (the README says to delete
	// cache.db when turning sealing on); the live record must be sealed.
	if p := storedRecord(t, cfg.Path, k); p.Token != "" || len(p.SealedToken) == 0 {
		t.Fatalf("after Flush: stored token %q, %d sealed bytes; want it sealed", p.Token, len(p.SealedToken))
	}

	s, stats, _ = openStore(t, cfg)
	if got := s.Loaded(); stats != (LoadStats{Loaded: 1}) || len(got) != 1 || got[0].Token != sealedSecret {
		t.Errorf("reopen sealed: LoadStats = %+v, Loaded = %+v", stats, got)
	}
	if pending, _ := s.WriteStatus(); pending != 0 {
		t.Errorf("reopen sealed: pending = %d, want nothing to re-seal", pending)
	}
}

// TestSealedValueUnderAnotherKey: a sealed value copied under another
// bbolt key does not open there, even with its key fields rewritten to
// match, because the bbolt key is the seal's associated data.
func TestSealedValueUnderAnotherKey(t *testing.T) {
	victim := NewKey("default", "biz_victim", "", []string{"admin"})
	thief := NewKey("default", "biz_thief", "", []string{"admin"})
	tests := []struct {
		name    string
		rewrite func(p *storev1.Record) // applied to the copy
		want    LoadStats
	}{
		{"copied as is", func(*storev1.Record) {}, LoadStats{Loaded: 1, Undecodable: 1}},
		{"key fields rewritten", func(p *storev1.Record) {
			p.Credential, p.CompanyId, p.UserId, p.ScopedActions = thief.Credential, thief.CompanyID, thief.UserID, thief.Scopes
		}, LoadStats{Loaded: 1, Unsealable: 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := sealConfig(t, sealKeyA)
			s, _, closeS := openStore(t, cfg)
			s.Put(enc(victim), record(victim, sealedSecret, t0.Add(time.Hour)))
			closeS()

			p := storedRecord(t, cfg.Path, victim)
			tt.rewrite(p)
			v, err := proto.Marshal(p)
			if err != nil {
				t.Fatal(err)
			}
			writeRaw(t, cfg.Path, map[string][]byte{enc(thief): v})

			s, stats, _ := openStore(t, cfg)
			if stats != tt.want {
				t.Errorf("LoadStats = %+v, want %+v", stats, tt.want)
			}
			got := byKey(t, s.Loaded())
			if r, ok := got[enc(thief)]; ok {
				t.Errorf("copied value opened under %s: token %q", thief.Subject(), r.Token)
			}
			if got[enc(victim)].Token != sealedSecret {
				t.Errorf("original record: token %q, want it intact", got[enc(victim)].Token)
			}
		})
	}
}
