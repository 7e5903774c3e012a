package fleet

import (
	"bytes"
	"errors"
	"testing"
)

// TestOpenRefusesForeignFingerprint covers what only a holder of the fleet
// key could produce: a value sealed under the right name for another
// credential. Hosts of other credentials write under other names, so this
// check is defence in depth behind the keyed names.
func TestOpenRefusesForeignFingerprint(t *testing.T) {
	k, err := deriveKeys(bytes.Repeat([]byte{9}, KeySize))
	if err != nil {
		t.Fatal(err)
	}
	name := k.entry([]byte("cred-B"), "key").tok
	cases := []struct {
		name    string
		sealed  []byte
		wantErr error
	}{
		{"own record", k.seal(name, record{cred: []byte("cred-B"), a: 1, text: "tok"}), nil},
		{"another credential's record", k.seal(name, record{cred: []byte("cred-A"), a: 1, text: "tok"}), errForeign},
		{"a prefix of the credential", k.seal(name, record{cred: []byte("cred-"), a: 1, text: "tok"}), errForeign},
		{"sealed for another name", k.seal(k.entry([]byte("cred-B"), "other").tok, record{cred: []byte("cred-B"), text: "tok"}), nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r, err := k.open(name, []byte("cred-B"), c.sealed)
			switch {
			case c.name == "sealed for another name":
				if err == nil {
					t.Fatal("a value sealed for another Redis key opened")
				}
			case !errors.Is(err, c.wantErr):
				t.Fatalf("open: %v, want %v", err, c.wantErr)
			case err == nil && r.text != "tok":
				t.Fatalf("open: text %q", r.text)
			}
		})
	}
}

func TestNamesAreUnambiguous(t *testing.T) {
	k, err := deriveKeys(bytes.Repeat([]byte{9}, KeySize))
	if err != nil {
		t.Fatal(err)
	}
	// With a 0-byte separator these two pairs would hash the same input.
	a := k.entry([]byte("ab\x00"), "c").tok
	b := k.entry([]byte("ab"), "\x00c").tok
	if a == b {
		t.Fatalf("(cred, key) pairs that differ share the name %s", a)
	}
	if k.cred([]byte("ab")).pause == k.entry([]byte("ab"), "").tok {
		t.Fatal("a credential-wide name equals an entry name")
	}
}
