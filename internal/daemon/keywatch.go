package daemon

import (
	"context"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"
)

// keyWatchSettle is how long the watched files must be quiet before a
// reload: an editor or a rotation script writes in several steps.
const keyWatchSettle = 250 * time.Millisecond

// watchFiles asks for a reload (on reload, never blocking) whenever one of
// files is written, created, renamed or removed. It watches their
// directories, since a rotation usually renames a new file into place,
// which a watch on the old file would miss. Errors only log: SIGHUP
// still works.
func watchFiles(ctx context.Context, log *slog.Logger, files []string, reload chan<- struct{}) {
	if len(files) == 0 {
		return
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		log.Warn("cannot watch the key files; reload with SIGHUP after changing them", "err", err)
		return
	}
	defer w.Close()
	want := map[string]bool{}
	for _, f := range files {
		f = filepath.Clean(f)
		want[f] = true
		if err := w.Add(filepath.Dir(f)); err != nil {
			log.Warn("cannot watch a key file's directory; reload with SIGHUP after changing it", "dir", filepath.Dir(f), "err", err)
		}
	}
	var settle <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.Events:
			if !ok {
				return
			}
			if want[filepath.Clean(ev.Name)] && ev.Op&(fsnotify.Write|fsnotify.Create|fsnotify.Rename|fsnotify.Remove) != 0 {
				settle = time.After(keyWatchSettle)
			}
		case err, ok := <-w.Errors:
			if !ok {
				return
			}
			log.Warn("key file watch", "err", err)
		case <-settle:
			settle = nil
			log.Info("a key file changed; reloading")
			select {
			case reload <- struct{}{}:
			default: // a reload is already pending
			}
		}
	}
}
