/* Empty on purpose. librdkafka 2.12's cmake build includes <curl/curl.h>
 * even when curl support is off (librdkafka issue #5135); edgegate builds it
 * without curl, so nothing from this header is used. */
