package cache

import (
	bolt "go.etcd.io/bbolt"
	"google.golang.org/protobuf/proto"

	"bytes"
	storev1 "github.com/tokend/tokend/proto/tokend/store/v1"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestSealedTokensAtRest(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cache.db")
	keyA := bytes.Repeat([]byte{0xA}, 32)
	keyB := bytes.Repeat([]byte{0xB}, 32)
	secret := "eyJhbGciOiJIUzI1NiJ9.sealed-token-under-test.c2lnbmF0dXJl"
	exp := time.Now().Add(time.Hour)
	open := func(key []byte) (*Cache, LoadStats) {
		t.Helper()
		c, st, err := Open(Config{Path: path, SealKey: key})
		if err != nil {
			t.Fatal(err)
		}
		return c, st
	}
	k := NewKey("default", "biz_seal", "", []string{"chat:read"})

	c, _ := open(keyA)
	e, _ := c.Ensure(k)
	c.SetToken(e, &Token{Value: secret, ExpiresAt: exp}, nil)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, []byte(secret)) || bytes.Contains(raw, []byte("sealed-token-under-test")) {
		t.Fatal("the raw bbolt file holds the token string")
	}

	c, st := open(keyA)
	if st.Loaded != 1 || c.Get(k.Encode()).Token().Value != secret {
		t.Fatalf("reopen with the same key: %+v", st)
	}
	c.Close()

	c, st = open(keyB)
	if st.Loaded != 0 || st.Unsealable != 1 || c.Len() != 0 {
		t.Fatalf("reopen with another key: %+v, %d entries; want the record discarded", st, c.Len())
	}
	c.Close()

	// A plain file opened with a key is sealed on the next write.
	os.Remove(path)
	c, _ = open(nil)
	e, _ = c.Ensure(k)
	c.SetToken(e, &Token{Value: secret, ExpiresAt: exp}, nil)
	c.Close()
	if raw, _ := os.ReadFile(path); !bytes.Contains(raw, []byte(secret)) {
		t.Fatal("without a key the token should be stored plain")
	}
	c, st = open(keyA)
	if st.Loaded != 1 {
		t.Fatalf("plain record with a key configured: %+v", st)
	}
	c.Close() // flushes the re-sealed record
	// bbolt does not zero freed pages, so the raw file may still hold the
	// old plain copy until the page is reused (README says to delete
	// cache.db when turning sealing on); the live record must be sealed.
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	var rec storev1.Record
	db.View(func(tx *bolt.Tx) error {
		return proto.Unmarshal(tx.Bucket(entriesBucket).Get(k.Encode()), &rec)
	})
	db.Close()
	if rec.Token != "" || len(rec.SealedToken) == 0 {
		t.Fatal("plain record was not re-sealed once a key was configured")
	}
	c, st = open(nil)
	if st.Unsealable != 1 {
		t.Fatalf("sealed record opened without a key: %+v; want it discarded", st)
	}
	c.Close()

	if _, _, err := Open(Config{Path: path, SealKey: []byte("short")}); err == nil {
		t.Fatal("a 5-byte cache key was accepted")
	}
}
