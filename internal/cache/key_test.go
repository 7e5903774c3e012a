package cache

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// testKeys are distinct keys chosen to probe the encoding: empty fields,
// subjects in different slots, separators and bytes that look like length
// prefixes inside the strings.
var testKeys = []struct {
	name string
	key  Key
}{
	{"zero", NewKey("", "", "", nil)},
	{"company", NewKey("cred", "biz_a", "", nil)},
	{"user", NewKey("cred", "", "biz_a", nil)},
	{"company and user", NewKey("cred", "biz_a", "user_b", nil)},
	{"user in company slot", NewKey("cred", "user_b", "biz_a", nil)},
	{"credential only", NewKey("biz_a", "", "", nil)},
	{"one scope", NewKey("cred", "biz_a", "", []string{"a"})},
	{"two scopes", NewKey("cred", "biz_a", "", []string{"a", "b"})},
	{"comma scope", NewKey("cred", "biz_a", "", []string{"a,b"})},
	{"joined scope", NewKey("cred", "biz_a", "", []string{"ab"})},
	{"empty-string scope", NewKey("cred", "biz_a", "", []string{""})},
	{"empty and a", NewKey("cred", "biz_a", "", []string{"", "a"})},
	{"prefix bytes in credential", NewKey("c\x01x\x00", "", "", nil)},
	{"prefix bytes split", NewKey("c", "x", "", nil)},
	{"prefix bytes in scope", NewKey("cred", "", "", []string{"\x01a\x01b"})},
	{"scope count lookalike", NewKey("cred\x00\x00\x01\x01a", "", "", nil)},
	{"long fields", NewKey(strings.Repeat("k", 300), strings.Repeat("c", 128), strings.Repeat("u", 129), []string{strings.Repeat("s", 200), "t"})},
	{"non-ascii", NewKey("clé", "société", "ユーザー", []string{"é", "\xff"})},
}

func TestNewKeyCanonical(t *testing.T) {
	base := NewKey("cred", "biz_1", "user_2", []string{"a", "b", "c"})
	tests := []struct {
		name   string
		scopes []string
	}{
		{"sorted", []string{"a", "b", "c"}},
		{"reversed", []string{"c", "b", "a"}},
		{"shuffled", []string{"b", "c", "a"}},
		{"duplicates", []string{"a", "b", "a", "c", "c", "b"}},
		{"all duplicated", []string{"c", "c", "b", "b", "a", "a"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := NewKey("cred", "biz_1", "user_2", tt.scopes)
			if !bytes.Equal(k.Encode(), base.Encode()) {
				t.Errorf("Encode = %x, want %x", k.Encode(), base.Encode())
			}
			if k.ID() != base.ID() {
				t.Errorf("ID = %s, want %s", k.ID(), base.ID())
			}
			if !slices.Equal(k.Scopes, []string{"a", "b", "c"}) {
				t.Errorf("Scopes = %q, want [a b c]", k.Scopes)
			}
		})
	}
}

func TestNewKeyDoesNotAliasScopes(t *testing.T) {
	scopes := []string{"b", "a"}
	k := NewKey("cred", "biz", "", scopes)
	enc := k.Encode()
	scopes[0], scopes[1] = "z", "y"
	if !bytes.Equal(k.Encode(), enc) {
		t.Fatalf("key changed when the caller's slice did: %q", k.Scopes)
	}
	if !slices.Equal(scopes, []string{"z", "y"}) {
		t.Fatalf("NewKey modified the caller's slice")
	}
}

func TestNewKeyNilAndEmptyScopes(t *testing.T) {
	nilKey := NewKey("cred", "biz", "", nil)
	emptyKey := NewKey("cred", "biz", "", []string{})
	if !bytes.Equal(nilKey.Encode(), emptyKey.Encode()) || nilKey.ID() != emptyKey.ID() {
		t.Fatalf("nil and empty scopes differ: %x vs %x", nilKey.Encode(), emptyKey.Encode())
	}
	if emptyKey.Scopes != nil {
		t.Errorf("empty scopes kept as %#v, want nil", emptyKey.Scopes)
	}
	for _, scopes := range [][]string{{""}, {"a"}, {"a", "b"}} {
		k := NewKey("cred", "biz", "", scopes)
		if bytes.Equal(k.Encode(), nilKey.Encode()) || k.ID() == nilKey.ID() {
			t.Errorf("scopes %q encode like the empty set", scopes)
		}
	}
}

// TestKeysDistinct checks every pair of testKeys, which covers subject slots
// (company vs user vs both) and separator lookalikes.
func TestKeysDistinct(t *testing.T) {
	encs := make(map[string]string)
	ids := make(map[string]string)
	for _, tk := range testKeys {
		enc := string(tk.key.Encode())
		if other, ok := encs[enc]; ok {
			t.Errorf("%s and %s encode alike: %x", tk.name, other, enc)
		}
		encs[enc] = tk.name
		id := tk.key.ID()
		if other, ok := ids[id]; ok {
			t.Errorf("%s and %s share id %s", tk.name, other, id)
		}
		ids[id] = tk.name
	}
}

func TestKeyCollisionPairs(t *testing.T) {
	tests := []struct {
		name string
		a, b Key
	}{
		{"company vs user", NewKey("", "biz_a", "", nil), NewKey("", "", "biz_a", nil)},
		{"credential vs company", NewKey("biz_a", "", "", nil), NewKey("", "biz_a", "", nil)},
		{"company vs both", NewKey("c", "biz_a", "", nil), NewKey("c", "biz_a", "user", nil)},
		{"user vs both", NewKey("c", "", "user", nil), NewKey("c", "biz_a", "user", nil)},
		{"comma", NewKey("c", "", "", []string{"a,b"}), NewKey("c", "", "", []string{"a", "b"})},
		{"concatenation", NewKey("c", "", "", []string{"ab"}), NewKey("c", "", "", []string{"a", "b"})},
		{"split across fields", NewKey("ab", "", "", nil), NewKey("a", "b", "", nil)},
		{"slash subject", NewKey("c", "a/b", "", nil), NewKey("c", "a", "b", nil)},
		// "\x01b" after credential "a" reads like a length prefix of "b".
		{"length prefix lookalike", NewKey("a\x01b", "", "", nil), NewKey("a", "b", "", nil)},
		{"scope count lookalike", NewKey("c", "", "\x01\x01a", nil), NewKey("c", "", "", []string{"a"})},
		{"empty scope vs none", NewKey("c", "", "", []string{""}), NewKey("c", "", "", nil)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if bytes.Equal(tt.a.Encode(), tt.b.Encode()) {
				t.Errorf("keys collide: %x", tt.a.Encode())
			}
			if tt.a.ID() == tt.b.ID() {
				t.Errorf("ids collide: %s", tt.a.ID())
			}
		})
	}
}

var idPattern = regexp.MustCompile(`^[0-9a-f]{12}$`)

func TestKeyIDFormat(t *testing.T) {
	for _, tk := range testKeys {
		t.Run(tk.name, func(t *testing.T) {
			id := tk.key.ID()
			if !idPattern.MatchString(id) || len(id) != IDLen {
				t.Errorf("ID = %q, want %d lowercase hex digits", id, IDLen)
			}
			if again := tk.key.ID(); again != id {
				t.Errorf("ID not stable: %s then %s", id, again)
			}
		})
	}
}

// TestKeyEncodingGolden pins the on-disk format: the encoding is the bbolt
// key and the id is shown to users, so both must survive restarts and
// upgrades. If this fails, old cache files and printed ids no longer match.
func TestKeyEncodingGolden(t *testing.T) {
	k := NewKey("cred", "biz_1", "user_2", []string{"b", "a"})
	const (
		wantEnc = "\x01" + "\x04cred" + "\x05biz_1" + "\x06user_2" + "\x02" + "\x01a" + "\x01b"
		wantID  = "ee91e85399d4"
	)
	if got := k.Encode(); string(got) != wantEnc {
		t.Errorf("Encode = %x, want %x", got, wantEnc)
	}
	if got := k.ID(); got != wantID {
		t.Errorf("ID = %s, want %s", got, wantID)
	}
}

func TestKeySubject(t *testing.T) {
	tests := []struct {
		name          string
		company, user string
		want          string
	}{
		{"company", "biz_1", "", "biz_1"},
		{"user", "", "user_1", "user_1"},
		{"both", "biz_1", "user_1", "biz_1/user_1"},
		{"neither", "", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := NewKey("c", tt.company, tt.user, nil).Subject(); got != tt.want {
				t.Errorf("Subject = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestDecodeKeyRoundTrip(t *testing.T) {
	for _, tk := range testKeys {
		t.Run(tk.name, func(t *testing.T) {
			enc := tk.key.Encode()
			got, err := DecodeKey(enc)
			if err != nil {
				t.Fatalf("DecodeKey(%x): %v", enc, err)
			}
			if got.Credential != tk.key.Credential || got.CompanyID != tk.key.CompanyID ||
				got.UserID != tk.key.UserID || !slices.Equal(got.Scopes, tk.key.Scopes) {
				t.Errorf("DecodeKey = %#v, want %#v", got, tk.key)
			}
			if (got.Scopes == nil) != (tk.key.Scopes == nil) {
				t.Errorf("Scopes nil-ness changed: got %#v, want %#v", got.Scopes, tk.key.Scopes)
			}
			if re := got.Encode(); !bytes.Equal(re, enc) {
				t.Errorf("re-encoded %x, want %x", re, enc)
			}
		})
	}
}

// rawKey builds an encoding field by field, bypassing NewKey's
// canonicalisation, so tests can write what Encode never would.
func rawKey(version byte, cred, company, user string, scopes ...string) []byte {
	b := []byte{version}
	for _, s := range []string{cred, company, user} {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	b = binary.AppendUvarint(b, uint64(len(scopes)))
	for _, s := range scopes {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	return b
}

func TestDecodeKeyRejects(t *testing.T) {
	valid := NewKey("cred", "biz_1", "user_2", []string{"a", "b"}).Encode()
	if _, err := DecodeKey(rawKey(keyVersion, "cred", "biz_1", "user_2", "a", "b")); err != nil {
		t.Fatalf("rawKey builds an invalid encoding: %v", err)
	}
	tests := []struct {
		name string
		in   []byte
	}{
		{"nil", nil},
		{"empty", []byte{}},
		{"version only", []byte{keyVersion}},
		{"version 0", append([]byte{0}, valid[1:]...)},
		{"version 2", append([]byte{2}, valid[1:]...)},
		{"version 0xff", append([]byte{0xff}, valid[1:]...)},
		{"trailing zero", append(bytes.Clone(valid), 0)},
		{"trailing bytes", append(bytes.Clone(valid), "xyz"...)},
		{"trailing empty scope", append(bytes.Clone(NewKey("c", "", "", nil).Encode()), 0)},
		{"unsorted scopes", rawKey(keyVersion, "cred", "biz", "", "b", "a")},
		{"duplicate scopes", rawKey(keyVersion, "cred", "biz", "", "a", "a")},
		{"duplicate empty scopes", rawKey(keyVersion, "cred", "biz", "", "", "")},
		{"unsorted after sorted", rawKey(keyVersion, "cred", "biz", "", "a", "c", "b")},
		{"length past end", []byte{keyVersion, 5, 'a', 'b'}},
		{"huge length", append([]byte{keyVersion}, binary.AppendUvarint(nil, 1<<62)...)},
		{"varint overflow", []byte{keyVersion, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0, 0, 0}},
		{"scope count past end", []byte{keyVersion, 0, 0, 0, 3, 0}},
		{"huge scope count", append([]byte{keyVersion, 0, 0, 0}, binary.AppendUvarint(nil, 1<<40)...)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, err := DecodeKey(tt.in)
			if err == nil {
				t.Fatalf("DecodeKey(%x) = %#v, want error", tt.in, k)
			}
			if !errors.Is(err, errBadKey) {
				t.Errorf("error %v does not wrap errBadKey", err)
			}
		})
	}
}

// TestDecodeKeyRejectsTruncation cuts every valid encoding at every offset:
// the format is self-delimiting, so no strict prefix may decode.
func TestDecodeKeyRejectsTruncation(t *testing.T) {
	for _, tk := range testKeys {
		t.Run(tk.name, func(t *testing.T) {
			enc := tk.key.Encode()
			for i := range len(enc) {
				if k, err := DecodeKey(enc[:i]); err == nil {
					t.Errorf("DecodeKey(enc[:%d] = %x) = %#v, want error", i, enc[:i], k)
				}
			}
		})
	}
}

// TestDecodeKeyRejectsNonMinimalVarint: DecodeKey promises that a decoded
// key re-encodes to the same bytes, which needs minimal varints: 0x80 0x00
// is a valid but overlong varint for 0, so accepting it gives a second
// encoding of the same key (a second bbolt key for one cache entry).
func TestDecodeKeyRejectsNonMinimalVarint(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
	}{
		{"credential length", []byte{keyVersion, 0x80, 0x00, 0, 0, 0}},
		{"company length", []byte{keyVersion, 0, 0x81, 0x00, 'a', 0, 0}},
		{"scope count", []byte{keyVersion, 0, 0, 0, 0x80, 0x00}},
		{"scope length", []byte{keyVersion, 0, 0, 0, 1, 0x81, 0x80, 0x00, 'a'}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, err := DecodeKey(tt.in)
			if err == nil {
				t.Errorf("DecodeKey(%x) = %#v (re-encodes as %x), want error", tt.in, k, k.Encode())
			}
		})
	}
}

func FuzzDecodeKey(f *testing.F) {
	for _, tk := range testKeys {
		f.Add(tk.key.Encode())
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		k, err := DecodeKey(b)
		if err != nil {
			return
		}
		if re := k.Encode(); !bytes.Equal(re, b) {
			t.Fatalf("DecodeKey(%x) = %#v re-encodes as %x", b, k, re)
		}
		if c := NewKey(k.Credential, k.CompanyID, k.UserID, k.Scopes); !bytes.Equal(c.Encode(), b) {
			t.Fatalf("decoded key %#v is not canonical", k)
		}
	})
}

func FuzzKeyCanonical(f *testing.F) {
	f.Add("cred", "biz", "user", "a\x00b\x00c", uint64(1))
	f.Add("", "", "", "", uint64(0))
	f.Add("c", "", "u", "b\x00a\x00b\x00\x00a", uint64(42))
	f.Add("c", "b", "", "a,b\x00ab\x00a\x00b", uint64(7))
	f.Fuzz(func(t *testing.T, cred, company, user, joined string, seed uint64) {
		var scopes []string
		if joined != "" {
			scopes = strings.Split(joined, "\x00")
		}
		shuffled := slices.Clone(scopes)
		r := rand.New(rand.NewPCG(seed, seed>>1))
		r.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		// Duplicate some scopes too: the set is what counts.
		if len(shuffled) > 0 {
			shuffled = append(shuffled, shuffled[r.IntN(len(shuffled))])
		}

		a := NewKey(cred, company, user, scopes)
		b := NewKey(cred, company, user, shuffled)
		if !bytes.Equal(a.Encode(), b.Encode()) || a.ID() != b.ID() {
			t.Fatalf("scopes %q and %q give different keys", scopes, shuffled)
		}
		if !slices.IsSorted(a.Scopes) || len(slices.Compact(slices.Clone(a.Scopes))) != len(a.Scopes) {
			t.Fatalf("Scopes %q not sorted and unique", a.Scopes)
		}
		d, err := DecodeKey(a.Encode())
		if err != nil {
			t.Fatalf("DecodeKey(Encode(%#v)): %v", a, err)
		}
		if !bytes.Equal(d.Encode(), a.Encode()) {
			t.Fatalf("round trip changed %#v into %#v", a, d)
		}
	})
}
