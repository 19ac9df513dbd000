/*
 * fallocate(FALLOC_FL_PUNCH_HOLE) for Node: a TRIM or WRITE_ZEROES on a replica gives the file
 * system its blocks back. Node's fs has no fallocate; this is the one system call Zebu needs that
 * it lacks. Built at install time by scripts/build-native.sh (Node-API, so any Node >= 18 loads it).
 *
 *   punchHole(fd, offset, length, callback(errno))   errno 0 on success
 *
 * The call runs on the libuv thread pool: on a large range the file system frees many extents
 * and journals them, which must not stall the event loop.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <linux/falloc.h>
#include <node_api.h>

typedef struct {
  int fd;
  int64_t offset;
  int64_t length;
  int err;
  napi_async_work work;
  napi_ref callback;
} PunchJob;

static void punch_execute(napi_env env, void *data) {
  (void)env;
  PunchJob *job = data;
  int r;
  do {
    r = fallocate(job->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)job->offset, (off_t)job->length);
  } while (r != 0 && errno == EINTR);
  job->err = r == 0 ? 0 : errno;
}

static void punch_complete(napi_env env, napi_status status, void *data) {
  PunchJob *job = data;
  napi_value callback, recv, arg;
  if (napi_get_reference_value(env, job->callback, &callback) == napi_ok &&
      napi_get_undefined(env, &recv) == napi_ok &&
      napi_create_int32(env, status == napi_ok ? job->err : ECANCELED, &arg) == napi_ok) {
    napi_call_function(env, recv, callback, 1, &arg, NULL);
  }
  napi_delete_reference(env, job->callback);
  napi_delete_async_work(env, job->work);
  free(job);
}

static napi_value punch_hole(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  int32_t fd;
  int64_t offset, length;
  napi_valuetype type;
  if (argc != 4 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], &offset) != napi_ok ||
      napi_get_value_int64(env, argv[2], &length) != napi_ok ||
      napi_typeof(env, argv[3], &type) != napi_ok || type != napi_function ||
      fd < 0 || offset < 0 || length <= 0) {
    napi_throw_type_error(env, NULL, "punchHole(fd >= 0, offset >= 0, length > 0, callback)");
    return NULL;
  }
  PunchJob *job = calloc(1, sizeof(*job));
  if (job == NULL) {
    napi_throw_error(env, NULL, "punchHole: out of memory");
    return NULL;
  }
  job->fd = fd;
  job->offset = offset;
  job->length = length;
  napi_value name;
  if (napi_create_string_utf8(env, "zebu:punchHole", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_reference(env, argv[3], 1, &job->callback) != napi_ok) {
    free(job);
    napi_throw_error(env, NULL, "punchHole: cannot start");
    return NULL;
  }
  if (napi_create_async_work(env, NULL, name, punch_execute, punch_complete, job, &job->work) != napi_ok ||
      napi_queue_async_work(env, job->work) != napi_ok) {
    napi_delete_reference(env, job->callback);
    free(job);
    napi_throw_error(env, NULL, "punchHole: cannot queue");
    return NULL;
  }
  return NULL;
}

NAPI_MODULE_INIT() {
  napi_value fn;
  if (napi_create_function(env, "punchHole", NAPI_AUTO_LENGTH, punch_hole, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "punchHole", fn) != napi_ok) return NULL;
  return exports;
}
